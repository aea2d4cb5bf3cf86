"""Scoring CPU per image of issue 23's model candidates against the default.

Real aligned images: elpv monocrystalline cells (the demo data's package), 224 px, Lite0's
default layers (28 x 28 grid). Two fits, an L2 and a cosine one (a fit keeps its bank patches'
grid positions); the coreset is the same greedy on the same features whatever the radius or
pooling, so every other candidate is a fitted model with its config changed, searching the same
bank. Each candidate scores the same pre-decoded batch `--repeats` times (one table per
`--batch` size: workers score batches of PATCHQ_BATCH_SIZE, 32 by default); the table gives
the median CPU ms per image (process CPU time, `--threads` for torch and FAISS, so that other
work on a shared machine disturbs it less than wall time) of the whole score (backbone, search,
whole-image parts) and of the patch search alone, and the whole score's ratio to the default.
The issue's goal: the chosen model's scoring CPU per image at most 2x the default's.

    PYTHONPATH=. .venv/bin/python bench/candidates_cost.py [--bank-images 80 --ratio 0.2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import torch

from common.data.batches import decode_batch
from common.data.layouts import discover
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig as Config
from common.engine.patchcore import PatchCore, extract_patches, search_vectors
from common.engine.position_search import grid_positions
from producer.demo_data import write_elpv_demo

CANDIDATES: dict[str, dict[str, object]] = {
    "default (l2, s*)": {},
    "cosine": {"distance": "cosine"},
    "position r=1": {"position_radius": 1},
    "position r=2": {"position_radius": 2},
    "position r=3": {"position_radius": 3},
    "top share 0.01": {"top_share": 0.01},
    "cosine + position r=2": {"distance": "cosine", "position_radius": 2},
    "cosine + r=2 + top 0.01": {"distance": "cosine", "position_radius": 2, "top_share": 0.01},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-images", type=int, default=80, help="good images in the bank")
    parser.add_argument("--ratio", type=float, default=0.2, help="coreset ratio")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[32, 1], help="images per scored batch"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and FAISS threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(f"load average before: {_load()}; {args.threads} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        models, batch = _fit(Path(tmp), args.bank_images, args.ratio, max(args.batch))
    default = models["l2"]
    print(
        f"bank: {default.bank.size} patches of {default.bank.dim} dims, index "
        f"{default.bank.index_type}; 224 px"
    )
    for size in args.batch:
        print(f"\nbatches of {size}:\n")
        _cost_table(models, batch[:size], args.repeats)
    print(f"\nload average after: {_load()}")


def _fit(
    root: Path, bank_images: int, ratio: float, batch: int
) -> tuple[dict[str, PatchCore], torch.Tensor]:
    """The L2 and cosine models and a batch of test cells."""
    holdout = 0.2
    good = round(bank_images / (1 - holdout))
    write_elpv_demo(root, ["mono"], limit_per_category=3 * good, bad_train_share=0.0)
    records = discover(root, ["mono"])
    train = [r for r in records if r.split == "train" and r.label == 0][:good]
    base = Config(coreset_ratio=ratio, precision="float32")
    models = {
        distance: fit_category(
            train, dataclasses.replace(base, distance=distance), holdout, "cpu", progress=False
        ).model
        for distance in ("l2", "cosine")
    }
    tests = sorted(r.path for r in records if r.split == "test")[:batch]
    return models, decode_batch(tests, models["l2"].preprocessing).tensor


def _cost_table(models: dict[str, PatchCore], batch: torch.Tensor, repeats: int) -> None:
    print("| candidate | score CPU ms/image | search CPU ms/image | score vs default |")
    print("|---|---|---|---|")
    baseline = None
    for name, options in CANDIDATES.items():
        model = _variant(models, options)
        total = _median_ms(lambda m=model: m.score_tensors(batch), repeats) / len(batch)
        search = _search_ms(model, batch, repeats) / len(batch)
        baseline = baseline or total
        print(f"| {name} | {total:.1f} | {search:.2f} | {total / baseline:.2f}x |")


def _variant(models: dict[str, PatchCore], options: dict[str, object]) -> PatchCore:
    """A fitted model of the candidate's distance, with the candidate's other options."""
    fitted = models[str(options.get("distance", "l2"))]
    changes = {"position_radius": None, "top_share": None} | options
    config = dataclasses.replace(fitted.config, **changes)  # type: ignore[arg-type]
    return PatchCore(
        config,
        fitted.extractor,
        fitted.bank,
        fitted.calibration,
        fitted.global_scorer,
        fitted.part_calibration,
        fitted.pixel_scorer,
    )


def _search_ms(model: PatchCore, batch: torch.Tensor, repeats: int) -> float:
    patches = extract_patches(model.extractor, model.config, batch)
    b, h, w, d = patches.shape
    vectors = search_vectors(model.config, patches.reshape(-1, d))
    cells = grid_positions(b, h, w)
    return _median_ms(lambda: model.nearest(vectors, cells), repeats)


def _median_ms(work: Callable[[], object], repeats: int) -> float:
    """Median process CPU milliseconds of ``work``, after one warm-up call (which builds the
    position-aware search's cell lists)."""
    work()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        work()
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
