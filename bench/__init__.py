"""Benchmarks: each runs a baseline and our code in one run, on the same data, and prints a ratio."""
