"""Small synthetic data for tests: textures with drawn defects, in the seed and MVTec layouts.

Tests generate their images instead of shipping any, so they run offline and fast. A texture is
smooth random shading plus stripes and grain, so normal images differ from each other the way
real product images do; a defect is a local change (a scratch or a spot) that a patch model can
find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFECT_KINDS = ("scratch", "spot")


def make_texture(size: int, seed: int) -> np.ndarray:
    """A normal image: uint8 RGB array (size, size, 3)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(90, 160, (4, 4, 3)).astype(np.uint8)
    shading = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
    columns = np.arange(size)[None, :, None]
    stripes = 20 * np.sin(2 * np.pi * (columns + rng.uniform(0, 8)) / 8)
    grain = rng.normal(0, 6, (size, size, 3))
    return np.clip(shading + stripes + grain, 0, 255).astype(np.uint8)


def draw_defect(image: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A copy of `image` with one defect drawn, and its mask (uint8, 255 on the defect)."""
    rng = np.random.default_rng(seed)
    size = image.shape[0]
    mask = Image.new("L", (image.shape[1], size), 0)
    pen = ImageDraw.Draw(mask)
    x0, y0 = rng.integers(size // 8, size // 2, 2)
    if kind == "scratch":
        x1, y1 = rng.integers(size // 2, size - size // 8, 2)
        pen.line((int(x0), int(y0), int(x1), int(y1)), fill=255, width=max(2, size // 32))
    elif kind == "spot":
        radius = size // 8
        pen.ellipse((int(x0), int(y0), int(x0) + radius, int(y0) + radius), fill=255)
    else:
        raise ValueError(f"defect kind must be one of {DEFECT_KINDS}, got {kind!r}")
    mask_array = np.asarray(mask)
    defective = image.copy()
    defective[mask_array > 0] = (20, 20, 20) if kind == "scratch" else (230, 60, 40)
    return defective, mask_array


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


def draw_variant(image: np.ndarray) -> np.ndarray:
    """A copy of `image` with an acceptable mark the normal images lack: a new label, printed
    at the same place on every such product (a false alarm until the model learns it)."""
    size = image.shape[0]
    marked = image.copy()
    top, side = size // 2, size // 3
    marked[top : top + side, top : top + side] = (40, 60, 220)
    return marked


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
