"""Accuracy benchmark on synthetic data: run `python -m tests.bench.accuracy`."""
