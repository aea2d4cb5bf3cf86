"""A real demo data set, offline: solar-cell EL images from the `elpv-dataset` PyPI package.

The package ships 2,624 grayscale 300x300 electroluminescence images of mono- and
polycrystalline solar cells, each with a defect probability (0, 1/3, 2/3, 1) from expert
annotators. `write_elpv_demo` lays them out in the seed layout, one category per cell type.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

from common.errors import PatchqError

CATEGORIES = ("mono", "poly")
_MARKER = ".patchq-demo.json"
_README = """\
patchq demo data: solar-cell electroluminescence (EL) images, one category per cell type.

Source: the elpv-dataset package (https://github.com/zae-bayern/elpv-dataset), images and labels
by Deitsch et al., "Automatic classification of defective photovoltaic module cells in
electroluminescence images", Solar Energy 185 (2019); Buerhop-Lutz et al., EU PVSEC 2018.
Licence of the images and labels: CC BY-NC-SA 4.0 (non-commercial, share alike).

Layout: <category>/train/good  functional cells (defect probability 0), the normal references
        <category>/train/bad   a share of the defective cells (probability 1), for validation
        <category>/test/       unlabelled: the other functional and defective cells, and the
                               cells the annotators were unsure about (probability 1/3 or 2/3)
        <category>/test_labels.csv  answer key for test/ (label empty where unsure)
"""


class DemoDataError(PatchqError):
    """The demo folder cannot be written as asked."""


def write_elpv_demo(
    root: Path,
    categories: Sequence[str] = CATEGORIES,
    limit_per_category: int | None = None,
    good_test_share: float = 0.2,
    bad_train_share: float = 0.5,
    seed: int = 0,
) -> Path:
    """Write the demo data set under `root` (seed layout) and return `root`.

    `limit_per_category` caps the cells drawn per category (each class cut in proportion) for
    quick runs. Idempotent: a `root` already holding this exact demo is left untouched. The set is
    built in a sibling folder and renamed into place, so an interrupted run never leaves a
    half-written set that looks complete.
    """
    root = Path(root)
    settings = {
        "categories": list(categories),
        "limit_per_category": limit_per_category,
        "good_test_share": good_test_share,
        "bad_train_share": bad_train_share,
        "seed": seed,
    }
    _check_settings(settings)
    if _existing_settings(root) == settings:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DemoDataError(
            f"{root}: already exists and holds other files; give an empty or new folder"
        )
    source, cells = _elpv_cells()
    staging = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for category in categories:
        chosen = [c for c in cells if c[2] == category]
        _write_category(staging / category, source, _split(chosen, settings))
    (staging / "README.txt").write_text(_README, encoding="utf-8")
    (staging / _MARKER).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    staging.replace(root)
    return root


def _check_settings(settings: dict) -> None:
    unknown = sorted(set(settings["categories"]) - set(CATEGORIES))
    if unknown or not settings["categories"]:
        raise DemoDataError(f"demo categories must be among {', '.join(CATEGORIES)}, got {unknown}")
    limit = settings["limit_per_category"]
    if limit is not None and limit < 4:
        raise DemoDataError(f"limit_per_category must be at least 4 or empty, got {limit}")
    for name in ("good_test_share", "bad_train_share"):
        if not 0 <= settings[name] <= 1:
            raise DemoDataError(f"{name} must be between 0 and 1, got {settings[name]}")


def _existing_settings(root: Path) -> dict | None:
    try:
        return json.loads((root / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _elpv_cells() -> tuple[Path, list[tuple[str, float, str]]]:
    """(data folder, [(relative image path, defect probability, cell type)]) from the package."""
    import elpv_dataset  # imported here: only `patchq demo` needs the package

    source = Path(elpv_dataset.__file__).parent / "data"
    lines = (source / "labels.csv").read_text(encoding="utf-8").split("\n")
    cells = [(p, float(prob), kind) for p, prob, kind in (ln.split() for ln in lines if ln.strip())]
    return source, cells


def _split(cells: list[tuple[str, float, str]], settings: dict) -> dict[str, list]:
    """Seeded split of one category's cells into train/good, train/bad and test/.

    Cells with probability 1/3 or 2/3 go to test/ only: the annotators were not sure whether
    they are defective, so they belong neither in the memory bank (which must hold normal
    cells only) nor among the defects that validation scores; in test/ they are realistic
    borderline cases to score.
    """
    rng = random.Random(settings["seed"])
    good = [c for c in cells if c[1] == 0.0]
    bad = [c for c in cells if c[1] == 1.0]
    unsure = [c for c in cells if 0.0 < c[1] < 1.0]
    limit = settings["limit_per_category"]
    pools = []
    for pool in (good, bad, unsure):
        rng.shuffle(pool)
        keep = len(pool) if limit is None else max(1, limit * len(pool) // len(cells))
        pools.append(pool[:keep])
    good, bad, unsure = pools
    n_good_test = round(len(good) * settings["good_test_share"])
    n_bad_train = round(len(bad) * settings["bad_train_share"])
    return {
        "train/good": good[n_good_test:],
        "train/bad": bad[:n_bad_train],
        "test": sorted(good[:n_good_test] + bad[n_bad_train:] + unsure),
    }


def _write_category(folder: Path, source: Path, split: dict[str, list]) -> None:
    for sub, cells in split.items():
        (folder / sub).mkdir(parents=True)
        for relative, _, _ in cells:
            _link_or_copy(source / relative, folder / sub / Path(relative).name)
    with (folder / "test_labels.csv").open("w", newline="", encoding="utf-8") as answers:
        writer = csv.writer(answers)
        writer.writerow(["path", "label", "defect_probability"])
        for relative, prob, _ in split["test"]:
            label = {0.0: "0", 1.0: "1"}.get(prob, "")
            writer.writerow([f"test/{Path(relative).name}", label, f"{prob:.2f}"])


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link (no extra disk, no re-encoding); copy the bytes where links are impossible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
