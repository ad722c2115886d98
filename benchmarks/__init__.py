"""acl_fused benchmarks: pytest-benchmark suites (bench_*.py) and ``python -m benchmarks.throughput``.

See benchmarks/README.md for what each module measures and benchmarks/RESULTS.md for results.
"""
