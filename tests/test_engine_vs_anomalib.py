"""bench/engine_vs_anomalib.py's patchq side on a few small images: the benchmark still runs
(anomalib itself needs its own venv, `make bench-anomalib`, and minutes)."""

from __future__ import annotations

import re

import pytest

from bench import engine_vs_anomalib


def test_patchq_rows_are_measured(capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--size", "64", "--train", "6", "--normals", "4", "--per-kind", "1"]
    engine_vs_anomalib.main(["--no-anomalib", "--search", "flat", *small])
    printed = capsys.readouterr().out
    row = re.search(r"^patchq fused, flat\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$",
                    printed, re.MULTILINE)  # fmt: skip
    assert row, printed
    assert int(row.group(2)) > 0 and 0.0 <= float(row.group(5)) <= 1.0
