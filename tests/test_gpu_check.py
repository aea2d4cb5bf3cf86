"""bench/gpu_check.sh without a GPU: a clear refusal; its measuring logic, run on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import faiss
import pytest
import torch

from bench import gpu_throughput, search_scaling

ROOT = Path(__file__).parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: run the check")
def test_gpu_check_refuses_clearly_without_cuda() -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env=os.environ | {"PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("gpu_check: torch sees no CUDA device")
    assert len(result.stderr.strip().splitlines()) == 1


def test_gpu_check_refuses_clearly_without_python(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        env=os.environ | {"PYTHON": str(tmp_path / "no-python")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "set PYTHON=" in result.stderr


def test_gpu_throughput_measures_a_worker_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The script's body on a CPU with tiny images: every backbone gets a row with images/s."""
    tiny = ["--images", "8", "--image-size", "64", "--batch-size", "4"]
    gpu_throughput.main(["--device", "cpu", "--backbones", "efficientnet_lite0", *tiny])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    measured = [row for row in rows if row and row[0] == "efficientnet_lite0"]
    assert len(measured) == 1 and float(measured[0][1]) > 0
    assert float(measured[0][3]) > 0  # decode_s: decoding is part of what is measured


def test_the_bank_size_sweep_measures_each_size_on_the_cpu(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The sweep's body with tiny banks: a row per size, with the index that searched it."""
    threads = (torch.get_num_threads(), faiss.omp_get_max_threads())
    try:
        search_scaling.main(["--device", "cpu", "--sizes", "500", "10000", "--images", "2"])
    finally:  # the script sets both for its process; the tests after this one keep theirs
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()]
    measured = [
        [cell.strip() for cell in row] for row in rows if row and row[0].strip()[0].isdigit()
    ]
    assert [row[:2] for row in measured] == [["500", "flat (faiss)"], ["10,000", "ivf (faiss)"]]
    assert all(float(row[3]) > 0 and 0.9 <= float(row[5]) <= 1 for row in measured)
