"""Benchmarks (not tests): each prints a table, writes JSONL and PNG, and records the
machine, versions and settings with every figure."""
