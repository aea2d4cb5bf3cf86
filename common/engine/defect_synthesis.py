"""Synthesised defects: what a category with no labelled defects chooses its model on.

`fit --auto` without labels pastes defects onto copies of the held-out normals and asks which
candidate model ranks those copies above the normals. Nothing made here ever enters a memory
bank or a calibration: the copies are scored, ranked and dropped.

Kinds come in two families, each at several sizes relative to the image side, so that a
candidate that only sees coarse changes cannot win on them alone:

- local: ``spot`` (a filled blob, 3 px up to ~6% of the side), ``scratch`` (a 1-2 px line),
  ``cut_paste`` (a small patch cut from *another* normal and blended in, after Li et al.,
  CutPaste, CVPR 2021: it has the category's own texture, in the wrong place) and ``swap``
  (a patch of the same image moved and turned a quarter, which breaks a texture's orientation);
- whole-image: ``blur``, ``contrast``, ``cast`` (a colour shift) and ``shift`` (the image
  turned a few degrees and enlarged a little, as a misplaced part would be).

The contrast of a spot or scratch is set by the image's own spread, not fixed grey levels,
so that a dark, faint or bright category gets defects of comparable visibility. The issue this
answers (23) measured the limits of such defects: small high-contrast spots and thin scratches
ranked the candidates of a fine texture as its real small defects did, but on polycrystalline
solar cells they favoured fine-grained candidates that real defects did not. The choice
(common/engine/auto.py) therefore uses them for what they can tell and says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, rotate

LOCAL_KINDS = ("spot", "scratch", "cut_paste", "swap")
GLOBAL_KINDS = ("blur", "contrast", "cast", "shift")
KINDS = LOCAL_KINDS + GLOBAL_KINDS
FAMILY = {kind: "local" for kind in LOCAL_KINDS} | {kind: "whole-image" for kind in GLOBAL_KINDS}

Synthesiser = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def synthesise(
    image: np.ndarray, donor: np.ndarray, kind: str, rng: np.random.Generator
) -> np.ndarray:
    """A defective copy of ``image`` (uint8 RGB (H, W, 3)); ``donor`` is another normal image
    that ``cut_paste`` takes its patch from (any size: it is resized to ``image``'s)."""
    if kind not in _SYNTHESISERS:
        raise ValueError(f"synthesised defect kind must be one of {KINDS}, got {kind!r}")
    return _SYNTHESISERS[kind](np.asarray(image, np.uint8), np.asarray(donor, np.uint8), rng)


def synthesise_set(
    images: Sequence[np.ndarray], kinds: Sequence[str], per_kind: int, seed: int
) -> tuple[list[np.ndarray], list[str], list[int]]:
    """``per_kind`` defective copies for each kind, made from the images in turn (each with
    another image of the set as its donor): (images, their kinds, the index of the normal each
    was made from). A fixed count per kind keeps the cost of a choice independent of how many
    normals were held out."""
    if len(images) < 2:
        raise ValueError("synthesising defects needs at least 2 normal images (one donates)")
    rng = np.random.default_rng(seed)
    made: list[np.ndarray] = []
    made_kinds: list[str] = []
    sources: list[int] = []
    for kind in kinds:
        for j in range(per_kind):
            i = j % len(images)
            donor = images[(i + int(rng.integers(1, len(images)))) % len(images)]
            made.append(synthesise(images[i], donor, kind, rng))
            made_kinds.append(kind)
            sources.append(i)
    return made, made_kinds, sources


def _spread(image: np.ndarray) -> float:
    """The image's grey-level spread, floored so that a flat image still gets a visible defect."""
    return max(float(image.mean(axis=2).std()), 8.0)


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` with the masked pixels moved 2-4 spreads darker or brighter (clipped)."""
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 4.0) * _spread(image)
    out = image.astype(np.float32)
    out[mask] += shift
    return np.clip(out, 0, 255).astype(np.uint8)


def _spot(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    side = min(image.shape[:2])
    diameter = int(rng.integers(3, max(4, round(0.06 * side)) + 1))
    y, x = (int(rng.integers(0, n - diameter + 1)) for n in image.shape[:2])
    mask = Image.new("L", (image.shape[1], image.shape[0]), 0)
    ImageDraw.Draw(mask).ellipse((x, y, x + diameter - 1, y + diameter - 1), fill=255)
    return _paint(image, np.asarray(mask) > 0, rng)


def _scratch(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    length = rng.uniform(0.08, 0.3) * min(height, width)
    angle = rng.uniform(0, np.pi)
    x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
    x1 = float(np.clip(x0 + length * np.cos(angle), 0, width - 1))
    y1 = float(np.clip(y0 + length * np.sin(angle), 0, height - 1))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).line((x0, y0, x1, y1), fill=255, width=int(rng.integers(1, 3)))
    return _paint(image, np.asarray(mask) > 0, rng)


def _patch_box(image: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A square patch of 4-12% of the side: (top, left, size)."""
    side = min(image.shape[:2])
    size = int(rng.integers(max(4, round(0.04 * side)), max(5, round(0.12 * side)) + 1))
    top, left = (int(rng.integers(0, n - size + 1)) for n in image.shape[:2])
    return top, left, size


def _blend(image: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """``patch`` laid into ``image`` at (top, left) through a feathered mask: a hard square
    edge would be a defect of its own that every candidate finds."""
    size = patch.shape[0]
    mask = np.zeros((size, size), np.float32)
    mask[1:-1, 1:-1] = 1.0
    mask = gaussian_filter(mask, sigma=max(size / 10, 0.5))[..., None]
    out = image.astype(np.float32)
    region = out[top : top + size, left : left + size]
    out[top : top + size, left : left + size] = mask * patch + (1 - mask) * region
    return np.clip(out, 0, 255).astype(np.uint8)


def _cut_paste(image: np.ndarray, donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if donor.shape != image.shape:
        donor = np.asarray(Image.fromarray(donor).resize((image.shape[1], image.shape[0])))
    top, left, size = _patch_box(image, rng)
    return _blend(image, _patch_from(donor, size, rng).astype(np.float32), top, left)


def _swap(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    top, left, size = _patch_box(image, rng)
    patch = np.rot90(_patch_from(image, size, rng))
    return _blend(image, patch.astype(np.float32), top, left)


def _patch_from(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` square of ``source`` at a random place (its top-left corner if the drawn box
    falls off the edge)."""
    top, left, _ = _patch_box(source, rng)
    patch = source[top : top + size, left : left + size]
    return patch if patch.shape[:2] == (size, size) else source[:size, :size]


def _blur(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(0.004, 0.008) * min(image.shape[:2])  # 1-2 px at 256 px
    return np.clip(gaussian_filter(image.astype(np.float32), (sigma, sigma, 0)), 0, 255).astype(
        np.uint8
    )


def _contrast(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = rng.choice([rng.uniform(0.5, 0.7), rng.uniform(1.4, 1.7)])
    mean = image.mean(axis=(0, 1), keepdims=True)
    return np.clip(mean + factor * (image.astype(np.float32) - mean), 0, 255).astype(np.uint8)


def _cast(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(15, 30)
    offsets = np.array([shift, 0.0, -shift], np.float32)
    return np.clip(image.astype(np.float32) + offsets, 0, 255).astype(np.uint8)


def _shift(image: np.ndarray, _donor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.choice([-1.0, 1.0]) * rng.uniform(4, 10)
    turned = rotate(image, angle, axes=(1, 0), reshape=False, order=1, mode="reflect")
    height, width = image.shape[:2]
    margin_y, margin_x = round(0.06 * height), round(0.06 * width)
    inner = turned[margin_y : height - margin_y, margin_x : width - margin_x]
    return np.asarray(Image.fromarray(inner).resize((width, height), Image.BILINEAR))


_SYNTHESISERS: dict[str, Synthesiser] = {
    "spot": _spot,
    "scratch": _scratch,
    "cut_paste": _cut_paste,
    "swap": _swap,
    "blur": _blur,
    "contrast": _contrast,
    "cast": _cast,
    "shift": _shift,
}
