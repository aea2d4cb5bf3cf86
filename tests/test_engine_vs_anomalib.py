"""bench/engine_vs_anomalib.py's patchq side on a few small images: the benchmark still runs
(anomalib itself needs its own venv, `make bench-anomalib`, and minutes)."""

from __future__ import annotations

import re

import pytest

from bench import engine_vs_anomalib


def test_patchq_rows_are_measured_at_each_train_size(capsys: pytest.CaptureFixture[str]) -> None:
    small = ["--size", "64", "--train", "6", "10", "--normals", "4", "--per-kind", "1"]
    engine_vs_anomalib.main(["--no-anomalib", "--search", "flat", *small])
    printed = capsys.readouterr().out
    rows = re.findall(r"^patchq fused, flat\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)",
                      printed, re.MULTILINE)  # fmt: skip
    assert len(rows) == 2, printed
    banks = [int(row[1]) for row in rows]
    assert 0 < banks[0] < banks[1], printed  # the larger train set's bank is larger
    assert all(0.0 <= float(row[4]) <= 1.0 for row in rows)
    ratio = re.search(r"^patchq fused, flat: 10 train \(\d+ bank\) scores at ([\d.]+)x the rate",
                      printed, re.MULTILINE)  # fmt: skip
    assert ratio and float(ratio.group(1)) > 0, printed
