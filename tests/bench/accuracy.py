"""AUROC per defect kind: plain PatchCore vs the global part, fusion, tiny-defect settings,
tiling and an ensemble, on held-out synthetic images (tests/bench/generators.py).

    .venv/bin/python -m tests.bench.accuracy [--size 384] [--train 30] [--normals 12] [--per-kind 8]

Every model is fitted on train/good only (a share held out for calibration, as patchq fit does)
and judged on separately generated test images it never saw: test normals vs each defect kind.
Several methods come from one fit: the raw parts (s*, global) and their fusions are all in the
scores of one pass. Prints a markdown table (rows: defect kinds, columns: methods).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from common.data.layouts import ImageRecord
from common.engine.ensemble import combine_members
from common.engine.fit import fit_category, score_records
from common.engine.normalise import fuse
from common.engine.patchcore import PatchCore, PatchCoreConfig
from tests.bench.generators import FAMILY, KINDS, make_defect, make_normal
from tests.synthetic import save

# name -> config; every model is fitted once with the global part.
CONFIGS = {
    "default": PatchCoreConfig(),
    "shallow": PatchCoreConfig(layers=("stage2", "stage3")),
    "large": PatchCoreConfig(image_size=384),
    "tiled": PatchCoreConfig(image_size=384, tile_size=224, tile_overlap=32),
}
# The columns reported per config: the default shows every part and fusion.
METHODS = {name: ("patch", "fused-max") for name in CONFIGS}
METHODS["default"] = ("patch", "global", "pixel", "fused-max", "fused-mean")


def write_set(
    root: Path, size: int, n_train: int, n_normals: int, per_kind: int
) -> tuple[list[ImageRecord], dict[str, list[ImageRecord]]]:
    """Train normals as records for fit; test records per kind ("good" = test normals)."""
    train = [
        ImageRecord(save(make_normal(size, i), root / "train" / f"{i}.png"), "bench", "train", 0)
        for i in range(n_train)
    ]
    test = {
        "good": [
            ImageRecord(
                save(make_normal(size, 5000 + i), root / "good" / f"{i}.png"), "bench", "test", 0
            )
            for i in range(n_normals)
        ]
    }
    for k, kind in enumerate(KINDS):
        test[kind] = [
            ImageRecord(
                save(make_defect(size, 10_000 + 100 * k + i, kind), root / kind / f"{i}.png"),
                "bench",
                "test",
                1,
                kind,
            )
            for i in range(per_kind)
        ]
    return train, test


def method_scores(model: PatchCore, parts: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of each raw part (s*, global, pixel) and both fusions from raw (n, 3) parts."""
    normalised = model.normalise_parts(*parts.T)
    return {
        "patch": parts[:, 0],
        "global": parts[:, 1],
        "pixel": parts[:, 2],
        "fused-max": fuse(normalised, "max"),
        "fused-mean": fuse(normalised, "mean"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="generated image size (px)")
    parser.add_argument("--train", type=int, default=30, help="train/good images")
    parser.add_argument("--normals", type=int, default=12, help="test normal images")
    parser.add_argument("--per-kind", type=int, default=8, help="test images per defect kind")
    parser.add_argument("--holdout", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        train, test = write_set(Path(folder), args.size, args.train, args.normals, args.per_kind)
        columns: dict[str, dict[str, np.ndarray]] = {}
        calibrations: dict[str, np.ndarray] = {}
        for name, config in CONFIGS.items():
            start = time.perf_counter()
            fit = fit_category(train, config, args.holdout, device="cpu", progress=False)
            model = fit.model
            per_kind = {
                kind: method_scores(model, score_records(model, recs, 16, False, kind)[0])
                for kind, recs in test.items()
            }
            for method in METHODS[name]:
                columns[f"{name} {method}"] = {k: s[method] for k, s in per_kind.items()}
            held_out = model.part_calibration
            calibrations[name] = fuse(model.normalise_parts(*held_out.T), "max")
            print(
                f"{name}: {time.perf_counter() - start:.0f} s, bank {model.bank.size}", flush=True
            )
        columns["ensemble default+shallow (fused-max)"] = _ensemble(
            columns, calibrations, ("default", "shallow")
        )
        print(_table(columns))


def _ensemble(
    columns: dict[str, dict[str, np.ndarray]],
    calibrations: dict[str, np.ndarray],
    names: tuple[str, ...],
) -> dict[str, np.ndarray]:
    """Mean of the members' z-scored fused-max scores (what common/engine/ensemble.py computes)."""
    member_calibration = [calibrations[n] for n in names]
    kinds = columns[f"{names[0]} patch"]
    return {
        kind: combine_members([columns[f"{n} fused-max"][kind] for n in names], member_calibration)
        for kind in kinds
    }


def _table(columns: dict[str, dict[str, np.ndarray]]) -> str:
    names = list(columns)
    lines = ["| defect kind | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for kind in KINDS:
        row = [_auroc(columns[n]["good"], columns[n][kind]) for n in names]
        lines.append(f"| {kind} ({FAMILY[kind]}) | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    for family in ("global", "tiny", "local"):
        kinds = [k for k in KINDS if FAMILY[k] == family]
        row = [np.mean([_auroc(columns[n]["good"], columns[n][k]) for k in kinds]) for n in names]
        lines.append(f"| **mean {family}** | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines)


def _auroc(normal: np.ndarray, defective: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defective))]
    return float(roc_auc_score(labels, np.r_[normal, defective]))


if __name__ == "__main__":
    main()
