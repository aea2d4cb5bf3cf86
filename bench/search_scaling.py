"""Patch search cost per image as the memory bank grows (issue 25 item 1).

Synthetic, said plainly: bank and query vectors are 152-dim (Lite0's default feature size) points
around 4,096 random centres, a stand-in for patch features' clustered structure (iid noise has
no neighbours for any approximate index to find). Each "image" is 784 query patches (a 28 x 28
grid, 224 px with Lite0's default layers) drawn from the same mixture, never bank rows. For each
bank size the table gives the resolved index, the median CPU ms per image of
``MemoryBank.search(queries, k=1)`` (the patch search alone, no backbone), the exact flat
search's for comparison, and the approximate search's recall@1 and largest relative change of an
image score (max patch distance) against the exact one.

With ``--fit-cells N`` it instead fits on N real elpv monocrystalline cells (labelled defects
included, 224 px, Lite0 features, the bank a random ``--max-bank`` sample of all bank patches)
and prints what fit measured of the approximate search against the exact one on the validation
images (validation "search").

    PYTHONPATH=. .venv/bin/python bench/search_scaling.py [--sizes 12544 50176 200704]
    PYTHONPATH=. .venv/bin/python bench/search_scaling.py --fit-cells 300 --max-bank 50000
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from common.data.layouts import discover
from common.engine.fit import fit_category
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from producer.demo_data import write_elpv_demo

DIM = 152
CENTRES = 4096
PATCHES_PER_IMAGE = 784


def clustered(rows: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Points around the shared random centres, float32 (rows, DIM)."""
    picked = centres[rng.integers(0, len(centres), rows)]
    return (picked + 0.5 * rng.standard_normal((rows, DIM))).astype(np.float32)


def cpu_ms_per_image(bank: MemoryBank, images: list[np.ndarray]) -> float:
    """Median process CPU ms of one image's patch search."""
    times = []
    for queries in images:
        start = time.process_time()
        bank.search(queries, k=1)
        times.append((time.process_time() - start) * 1000)
    return statistics.median(times)


def accuracy(bank: MemoryBank, exact: MemoryBank, images: list[np.ndarray]) -> tuple[float, float]:
    """(recall@1, largest relative image-score change) of ``bank`` against ``exact``."""
    hits, changes = [], []
    for queries in images:
        approx_d = bank.search(queries, k=1)[0]
        exact_d = exact.search(queries, k=1)[0]
        hits.append(np.mean(np.isclose(approx_d[:, 0], exact_d[:, 0], rtol=1e-5)))
        changes.append(abs(approx_d.max() - exact_d.max()) / exact_d.max())
    return float(np.mean(hits)), float(max(changes))


def fit_search_cost(cells: int, max_bank: int) -> None:
    """Fit on real elpv cells and print fit's measured search accuracy cost."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_elpv_demo(Path(tmp), ["mono"], limit_per_category=cells, bad_train_share=1)
        records = [r for r in discover(root, ["mono"]) if r.split == "train"]
        config = PatchCoreConfig(coreset_ratio=1.0, max_bank=max_bank)
        cpu = time.process_time()
        result = fit_category(records, config, device="cpu", progress=False)
        cpu = time.process_time() - cpu
    print(f"bank {result.model.bank.size:,} patches, validation {result.validation}")
    print(f"timings {result.timings}, fit process CPU {cpu:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12544, 50176, 200704])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit-cells", type=int)
    parser.add_argument("--max-bank", type=int, default=50_000)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args.fit_cells:
        fit_search_cost(args.fit_cells, args.max_bank)
        return
    rng = np.random.default_rng(0)
    centres = 3 * rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    images = [clustered(PATCHES_PER_IMAGE, rng, centres) for _ in range(args.images)]
    print(
        "| bank patches | index | search CPU ms/image | flat CPU ms/image | recall@1 |"
        " max image-score change |"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        vectors = clustered(size, rng, centres)
        bank, exact = MemoryBank(vectors), MemoryBank(vectors, index="flat")
        recall, change = accuracy(bank, exact, images)
        print(
            f"| {size:,} | {bank.index_type} | {cpu_ms_per_image(bank, images):.1f} | "
            f"{cpu_ms_per_image(exact, images):.1f} | {recall:.4f} | {change:.2%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
