"""The web console for authors: upload a book, watch it train, compare base and tuned text.

A client of the ingest, coordinator and inference gRPC services only (never the store).
"""
