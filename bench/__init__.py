"""bitfast benchmarks: `pytest bench/` (kernels and models), `python -m bench.report` (bench/REPORT.md)."""
