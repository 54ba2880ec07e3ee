"""Benchmarks: ``python -m benchmarks`` (``--quick`` for CI) runs them all and writes
``benchmarks/results/latest.json``; ``python -m benchmarks.bench_router`` is the router's own
micro-benchmark. See ``docs/performance.md``."""
