"""Benchmarks: `python -m bench <op> [--quick] [--json PATH]` runs bench/bench_<op>.py."""
