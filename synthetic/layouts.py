"""Small synthetic datasets on disk, in the folder layouts patchq reads (seed, MVTec AD), of
the tests' texture and defects (synthetic/textures.py): what tests and benchmarks fit and score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from synthetic.textures import DEFECT_KINDS, draw_defect, draw_variant, make_texture


def save(array: np.ndarray, path: Path) -> Path:
    """Write an array as an image file (format from the extension), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_seed_layout(
    root: Path, category: str, n_good: int, n_bad: int, n_test: int, size: int = 64
) -> Path:
    """ROOT/<category>/train/good, train/bad, test/ (half normal, half defective, unlabelled)."""
    folder = root / category
    for i in range(n_good):
        save(make_texture(size, i), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_bad):
        image = draw_defect(make_texture(size, 1000 + i), DEFECT_KINDS[i % 2], i)[0]
        save(image, folder / "train" / "bad" / f"{i:03d}.png")
    for i in range(n_test):
        image = make_texture(size, 2000 + i)
        if i % 2:
            image = draw_defect(image, DEFECT_KINDS[i % 2], i)[0]
        save(image, folder / "test" / f"{i:03d}.png")
    return folder


def make_mvtec_layout(
    root: Path, category: str, n_train: int, n_test_good: int, n_per_defect: int, size: int = 64
) -> Path:
    """MVTec AD layout with one test/<kind>/ folder and ground-truth masks per defect kind."""
    folder = root / category
    for i in range(n_train):
        save(make_texture(size, i), folder / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(make_texture(size, 2000 + i), folder / "test" / "good" / f"{i:03d}.png")
    for k, kind in enumerate(DEFECT_KINDS):
        for i in range(n_per_defect):
            image, mask = draw_defect(make_texture(size, 3000 + 100 * k + i), kind, i)
            save(image, folder / "test" / kind / f"{i:03d}.png")
            save(mask, folder / "ground_truth" / kind / f"{i:03d}_mask.png")
    return folder


def make_review_layout(
    root: Path, category: str, n_good: int, n_variant: int, n_defect: int, size: int = 64
) -> Path:
    """Seed layout for the review loop: train/good, and test/ (unlabelled) holding
    `n_variant` normal images with the acceptable mark (variant_NNN) and `n_defect` real
    defects (defect_NNN), for reviewers to tell apart."""
    folder = make_seed_layout(root, category, n_good, n_bad=0, n_test=0, size=size)
    for i in range(n_variant):
        save(draw_variant(make_texture(size, 4000 + i)), folder / "test" / f"variant_{i:03d}.png")
    for i in range(n_defect):
        image = draw_defect(make_texture(size, 5000 + i), DEFECT_KINDS[i % 2], 50 + i)[0]
        save(image, folder / "test" / f"defect_{i:03d}.png")
    return folder
