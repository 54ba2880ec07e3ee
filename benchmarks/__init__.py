"""Micro-benchmarks of the hot paths (run ``python -m benchmarks.bench_router``)."""
