"""`fit` without labelled defects: the label-free `--auto` against the default model.

    .venv/bin/python -m bench.label_free [--textures grain,stripes,mono,poly] [--draw 0-19] \
        [--train 60] [--normals 20] [--per-kind 6] [--elpv demo-data-full] [--elpv-train 150]

A category with good images only (issue 23's user): each synthetic draw writes its own seeds'
``--train`` good images (all that fit sees) and, apart, test images fit never sees:
``--normals`` normals and ``--per-kind`` images of each defect kind, in issue 23's families:
"small" (a few pixels across: speckle clusters and 3-8 px marks on the grain, 3-8 px spots and
1-2 px scratches on the stripes) and "whole-image" (synthetic/textures.py). elpv (real solar
cells, the demo set, written by producer/demo_data.py if absent) fits on ``--elpv-train``
good cells and is judged on the demo's labelled test cells. Each category is fitted as the
default (`--no-auto`) and label-free (the default where 8 normals are held out) on the same
images; a line per draw gives the test AUROC per family, the label-free choice, and its fit
and scoring CPU time against the default's. Over a range of draws a summary follows: mean and
lowest AUROC per family and how often each choice was made. The test images only judge: the
choice never sees them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.accuracy import draw_range, elpv_set
from common.data.layouts import ImageRecord
from common.engine.calibration import combine_parts
from common.engine.fit import fit_category, score_records
from common.engine.label_free import fit_label_free
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from synthetic.layouts import save
from synthetic.textures import (
    GLOBAL_KINDS,
    GRAIN_GLOBAL_KINDS,
    TINY_KINDS,
    draw_tiny_defect,
    make_defect,
    make_grain,
    make_grain_global,
    make_normal,
    make_speckle,
)

Maker = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class Texture:
    size: int
    normal: Maker
    families: dict[str, dict[str, Maker]]  # family -> kind -> defect maker (size, seed)


def _tiny_on(normal: Maker, kind: str) -> Maker:
    return lambda size, seed: draw_tiny_defect(normal(size, seed), kind, seed)


def _global_grain(kind: str) -> Maker:
    return lambda size, seed: make_grain_global(size, seed, kind)


def _stripes(kind: str) -> Maker:
    return lambda size, seed: make_defect(size, seed, kind)


TEXTURES = {
    "grain": Texture(
        256,
        make_grain,
        {
            "small": {"speckle": make_speckle} | {k: _tiny_on(make_grain, k) for k in TINY_KINDS},
            "whole-image": {k: _global_grain(k) for k in GRAIN_GLOBAL_KINDS},
        },
    ),
    "stripes": Texture(
        384,
        make_normal,
        {
            "small": {k: _stripes(k) for k in TINY_KINDS},
            "whole-image": {k: _stripes(k) for k in GLOBAL_KINDS},
        },
    ),
}
ELPV = ("mono", "poly")
MODELS = ("default", "label-free")


@dataclass(frozen=True)
class Outcome:
    """One category of one draw: test AUROC per model and family, the choice, the costs."""

    auroc: dict[str, dict[str, float]]  # model -> family -> AUROC
    chosen: str
    fit_ratio: float  # label-free fit wall time / the default's
    score_ratio: float  # label-free scoring CPU time per image / the default's


def write_draw(
    root: Path, name: str, args: argparse.Namespace, draw: int
) -> tuple[list[ImageRecord], dict[str, dict[str, list[ImageRecord]]]]:
    """Train normals (the only records fit gets) and test records: family -> kind -> records
    ("normal" -> "normal" for the test normals)."""
    texture, base = TEXTURES[name], 100_000 * draw

    def record(image: np.ndarray, rel: str, split: str, label: int) -> ImageRecord:
        return ImageRecord(save(image, root / name / f"{rel}.png"), name, split, label)

    size = texture.size
    train = [
        record(texture.normal(size, base + i), f"train/{i}", "train", 0) for i in range(args.train)
    ]
    normals = [
        record(texture.normal(size, base + 5000 + i), f"test/normal/{i}", "test", 0)
        for i in range(args.normals)
    ]
    test: dict[str, dict[str, list[ImageRecord]]] = {"normal": {"normal": normals}}
    for f, (family, kinds) in enumerate(texture.families.items()):
        test[family] = {}
        for k, (kind, make) in enumerate(kinds.items()):
            seeds = [base + 10_000 + 1000 * f + 100 * k + i for i in range(args.per_kind)]
            test[family][kind] = [
                record(make(size, s), f"test/{kind}/{s}", "test", 1) for s in seeds
            ]
    return train, test


def elpv_draw(
    root: Path, category: str, train_good: int
) -> tuple[list[ImageRecord], dict[str, dict[str, list[ImageRecord]]]]:
    """The demo's good train cells only (its train/bad is left out: no labels) and its labelled
    test cells."""
    train, test = elpv_set(root, category, train_good)
    good = [r for r in train if r.label == 0]
    return good, {"normal": {"normal": test["good"]}, "defect": {"defect": test["defect"]}}


def bench_category(
    train: list[ImageRecord], test: dict[str, dict[str, list[ImageRecord]]], holdout: float
) -> Outcome:
    base = PatchCoreConfig()
    start = time.perf_counter()
    default = fit_category(train, base, holdout, device="cpu", progress=False).model
    default_fit = time.perf_counter() - start
    start = time.perf_counter()
    chosen = fit_label_free(train, base, holdout, device="cpu", progress=False)
    label_free_fit = time.perf_counter() - start
    aurocs, costs = {}, {}
    for name, model in (("default", default), ("label-free", chosen.model)):
        aurocs[name], costs[name] = _judge(model, test)
    return Outcome(
        aurocs, chosen.chosen, label_free_fit / default_fit, costs["label-free"] / costs["default"]
    )


def _judge(
    model: PatchCore, test: dict[str, dict[str, list[ImageRecord]]]
) -> tuple[dict[str, float], float]:
    """Test AUROC per family (normals vs the family's defects) and scoring CPU s per image."""
    start, n = time.process_time(), 0
    scores: dict[str, np.ndarray] = {}
    for family, kinds in test.items():
        records = [r for recs in kinds.values() for r in recs]
        parts = score_records(model, records, 16, False, family)[0]
        scores[family] = combine_parts(model, parts)
        n += len(records)
    per_image = (time.process_time() - start) / n
    normal = scores.pop("normal")
    figures = {family: _auroc(normal, defect) for family, defect in scores.items()}
    if len(scores) > 1:
        figures["all"] = _auroc(normal, np.concatenate(list(scores.values())))
    return figures, per_image


def _auroc(normal: np.ndarray, defect: np.ndarray) -> float:
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
    return float(roc_auc_score(labels, np.r_[normal, defect]))


def _line(category: str, draw: int, outcome: Outcome) -> str:
    figures = "  ".join(
        f"{model} " + " ".join(f"{fam} {a:.3f}" for fam, a in outcome.auroc[model].items())
        for model in MODELS
    )
    return (
        f"{category:8} draw {draw:3}  {figures}  | chose {outcome.chosen}; fit x"
        f"{outcome.fit_ratio:.2f}, scoring x{outcome.score_ratio:.2f}"
    )


def _summary(category: str, outcomes: list[Outcome]) -> str:
    lines = [f"\n{category}, {len(outcomes)} draws: mean (lowest) test AUROC"]
    for model in MODELS:
        families = outcomes[0].auroc[model]
        row = "  ".join(
            f"{fam} {np.mean([o.auroc[model][fam] for o in outcomes]):.3f} "
            f"({min(o.auroc[model][fam] for o in outcomes):.3f})"
            for fam in families
        )
        lines.append(f"  {model:10} {row}")
    chosen = Counter(o.chosen for o in outcomes)
    lines.append("  label-free chose: " + ", ".join(f"{k} {n}x" for k, n in chosen.items()))
    fit = [o.fit_ratio for o in outcomes]
    score = [o.score_ratio for o in outcomes]
    lines.append(
        f"  label-free fit time x{np.mean(fit):.2f} of the default's (max x{max(fit):.2f}), "
        f"scoring CPU per image x{np.mean(score):.2f} (max x{max(score):.2f})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--textures", default="grain,stripes,mono,poly")
    parser.add_argument("--draw", type=draw_range, default=range(1), help="N or FIRST-LAST")
    parser.add_argument("--train", type=int, default=60, help="good images per synthetic draw")
    parser.add_argument("--normals", type=int, default=20, help="test normals per draw")
    parser.add_argument("--per-kind", type=int, default=6, help="test images per defect kind")
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--elpv", type=Path, default=Path("demo-data-full"))
    parser.add_argument("--elpv-train", type=int, default=150, help="good elpv cells to fit on")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, list[Outcome]] = defaultdict(list)
    for category in args.textures.split(","):
        draws = args.draw[:1] if category in ELPV else args.draw  # elpv is one fixed set
        for draw in draws:
            with tempfile.TemporaryDirectory() as folder:
                if category in ELPV:
                    train, test = elpv_draw(args.elpv, category, args.elpv_train)
                else:
                    train, test = write_draw(Path(folder), category, args, draw)
                outcome = bench_category(train, test, args.holdout)
            results[category].append(outcome)
            print(_line(category, draw, outcome), flush=True)
    for category, outcomes in results.items():
        print(_summary(category, outcomes))


if __name__ == "__main__":
    main()
