"""Benchmarks: the figures in docs/performance.md, run with `make bench`; never in the tests."""
