"""Generated gRPC stubs for novelcrafter.v1 (make proto)."""
