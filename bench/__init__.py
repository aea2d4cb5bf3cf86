"""Benchmarks: figures for the README, run with `make bench`; never part of the test suite."""
