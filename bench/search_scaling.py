"""Patch search cost per image as the memory bank grows (issue 25 item 1).

Synthetic, said plainly: bank and query vectors are 152-dim (Lite0's default feature size) points
around 4,096 random centres, a stand-in for patch features' clustered structure (iid noise has
no neighbours for any approximate index to find). Each "image" is 784 query patches (a 28 x 28
grid, 224 px with Lite0's default layers) drawn from the same mixture, never bank rows. For each
bank size and ``--index`` the table gives the resolved index and what searches it, the seconds
its build took, the median ms per image of ``MemoryBank.search(queries, k=1)`` (the patch
search alone, no backbone), the exact search's for comparison (the torch search: on CPU it took
2.4x less than FAISS flat at 1 thread), and the search's recall@1 and largest relative change
of an image score (max patch distance) against the exact one. Times are process CPU time on
``--device cpu`` and wall time on ``--device cuda`` (bench/gpu_check.sh's bank-size sweep).

With ``--fit-cells N`` it instead fits on N real elpv monocrystalline cells (labelled defects
included, 224 px, Lite0 features, the bank a random ``--max-bank`` sample of all bank patches)
and prints what fit measured of the approximate search (the first ``--index``) against the exact
one on the validation images (validation "search"). Fit audits a large bank on a sample of its
validation images; ``--score-test`` instead fits on every mono cell of the demo's train split
(``--fit-cells`` is then ignored) and also scores its labelled test cells (half the defective
cells and a fifth of the good ones, which neither the bank nor the validation saw) with the
model's search and with the exact one on the same patch features, and prints both AUROCs and
the largest change of an image's s*.

    PYTHONPATH=. .venv/bin/python bench/search_scaling.py [--sizes 12544 50176 200704]
        [--index auto ivf] [--threads 1] [--device cuda] [--pq-nprobe 8 16]
    PYTHONPATH=. .venv/bin/python bench/search_scaling.py --fit-cells 300 --max-bank 50000
        [--index ivfpq] [--score-test]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from bench.accuracy import elpv_set
from common.data.batches import decode_batch
from common.data.layouts import ImageRecord, discover
from common.engine.fit import fit_category, with_exact_search
from common.engine.memory_bank import INDEX_TYPES, MemoryBank, resolve_index
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore, extract_patches
from common.iterables import chunked
from producer.demo_data import write_elpv_demo

DIM = 152
CENTRES = 4096
PATCHES_PER_IMAGE = 784


def clustered(rows: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """Points around the shared random centres, float32 (rows, DIM)."""
    picked = centres[rng.integers(0, len(centres), rows)]
    return (picked + 0.5 * rng.standard_normal((rows, DIM))).astype(np.float32)


def timed_search(
    bank: MemoryBank, images: list[np.ndarray], now: Callable[[], float]
) -> tuple[float, list[np.ndarray]]:
    """(median ms of one image's patch search on the clock ``now``, each image's nearest
    distances)."""
    times, found = [], []
    for queries in images:
        start = now()
        found.append(bank.search(queries, k=1)[0][:, 0])
        times.append((now() - start) * 1000)
    return statistics.median(times), found


def accuracy(found: list[np.ndarray], exact: list[np.ndarray]) -> tuple[float, float]:
    """(recall@1, largest relative image-score change) of one search's distances against the
    exact search's."""
    hits = [np.mean(np.isclose(f, e, rtol=1e-5)) for f, e in zip(found, exact, strict=True)]
    changes = [abs(f.max() - e.max()) / e.max() for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits)), float(max(changes))


def built(
    vectors: np.ndarray, index: str, device: str, now: Callable[[], float], nprobe: int | None
) -> tuple[MemoryBank, float]:
    """A bank on ``vectors`` and the seconds its index took to build on the clock ``now``."""
    start = now()
    bank = MemoryBank(vectors, index=index, device=device, nprobe=nprobe)
    return bank, now() - start


def clock(device: str) -> tuple[str, Callable[[], float]]:
    """Process CPU time on a CPU, which a shared machine does not distort; wall time on CUDA,
    whose work a CPU clock does not see (a search returns to the host, so it has finished)."""
    return ("CPU", time.process_time) if device == "cpu" else ("wall", time.perf_counter)


def sweep(args: argparse.Namespace) -> None:
    """Print one table row per bank size and index: build, search, exact search, accuracy."""
    unit, now = clock(args.device)
    rng = np.random.default_rng(0)
    centres = 3 * rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    images = [clustered(PATCHES_PER_IMAGE, rng, centres) for _ in range(args.images)]
    print(
        f"| bank patches | index (backend) | build {unit} s | search {unit} ms/image | "
        f"exact {unit} ms/image | recall@1 | max image-score change |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        vectors = clustered(size, rng, centres)
        exact_bank = MemoryBank(vectors, index="torch", device=args.device)
        exact_ms, exact = timed_search(exact_bank, images, now)
        del exact_bank
        for index in args.index:
            pq = resolve_index(index, size) == "ivfpq"
            for nprobe in args.pq_nprobe if pq else [None]:
                bank, build_s = built(vectors, index, args.device, now, nprobe)
                search_ms, found = timed_search(bank, images, now)
                recall, change = accuracy(found, exact)
                lists = "" if nprobe is None else f", {nprobe} lists"
                print(
                    f"| {size:,} | {bank.index_type} ({bank.backend}{lists}) | {build_s:.1f} | "
                    f"{search_ms:.1f} | {exact_ms:.1f} | {recall:.4f} | {change:.2%} |",
                    flush=True,
                )
                del bank


def fit_search_cost(cells: int, max_bank: int, index: str, score_test: bool) -> None:
    """Fit on real elpv cells with ``index`` and print fit's measured search accuracy cost."""
    with tempfile.TemporaryDirectory() as tmp:
        if score_test:  # the demo's split: half the defective cells are labelled test cells
            train, test = elpv_set(Path(tmp), "mono", None)
        else:  # every defective cell is a labelled one fit validates on
            root = write_elpv_demo(Path(tmp), ["mono"], limit_per_category=cells, bad_train_share=1)
            train = [r for r in discover(root, ["mono"]) if r.split == "train"]
        config = PatchCoreConfig(coreset_ratio=1.0, max_bank=max_bank, index=index)
        cpu = time.process_time()
        result = fit_category(train, config, device="cpu", progress=False)
        cpu = time.process_time() - cpu
        print(f"bank {result.model.bank.size:,} patches, validation {result.validation}")
        print(f"timings {result.timings}, fit process CPU {cpu:.1f} s", flush=True)
        if score_test:
            test_split_cost(result.model, test["good"], test["defect"])


def test_split_cost(model: PatchCore, good: list[ImageRecord], defect: list[ImageRecord]) -> None:
    """AUROC of the test cells scored with the model's search and with the exact search."""
    test = good + defect
    exact = with_exact_search(model)
    found: list[np.ndarray] = []
    truth: list[np.ndarray] = []
    for batch in tqdm(list(chunked(test, 32)), desc="test cells, both searches", unit="batch"):
        images = decode_batch([r.path for r in batch], model.preprocessing).tensor
        patches = extract_patches(model.extractor, model.config, images)
        for scores, bank in ((found, model), (truth, exact)):
            result = bank.score_patches(patches, images)
            s_star = result.image_scores if result.patch_scores is None else result.patch_scores
            scores.append(np.c_[result.image_scores, s_star])
    labels = np.r_[np.zeros(len(good)), np.ones(len(defect))]
    approximate, reference = np.concatenate(found), np.concatenate(truth)
    change = np.abs(approximate[:, 1] / reference[:, 1] - 1).max()
    index = model.bank.index_type
    print(f"test split: {len(test)} cells ({int(labels.sum())} defective), index {index}")
    for column, name in enumerate(("image score", "s*")):
        print(
            f"  {name} AUROC: {roc_auc_score(labels, approximate[:, column]):.4f} with {index}, "
            f"{roc_auc_score(labels, reference[:, column]):.4f} exact"
        )
    print(f"  largest change of an image's s*: {change:.2%}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12544, 50176, 200704])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--index", nargs="+", default=["auto"], choices=INDEX_TYPES)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--pq-nprobe", type=int, nargs="+", default=[None], help="ivfpq lists to probe (rows each)"
    )
    parser.add_argument("--fit-cells", type=int)
    parser.add_argument("--max-bank", type=int, default=50_000)
    parser.add_argument("--score-test", action="store_true", help="--fit-cells: test split too")
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args.fit_cells or args.score_test:
        fit_search_cost(args.fit_cells, args.max_bank, args.index[0], args.score_test)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
