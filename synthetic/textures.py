"""Synthetic images for the tests and the benchmarks: normal textures and the defects drawn on
them, as uint8 RGB arrays.

Tests and benchmarks generate their images instead of shipping any, so they run offline.

The tests' texture (``make_texture``) is smooth random shading plus stripes and grain, so normal
images differ from each other the way real product images do; a defect (``draw_defect``) is a
local change (a scratch or a spot) that a patch model can find. It is small and quick to draw.

The benchmarks' texture (``make_normal``) varies *inside* each image: stripe orientation, stripe
period, stripe contrast, grain and colour drift smoothly over a 3x3 grid of control points within
fixed ranges. That makes a fair test of whole-image ("global") defects: a global defect moves the
whole image to one end of a range (all stripes tilted the same way, all coarse, all low-contrast,
blurred, or a colour cast), so every patch alone still resembles some patch of a normal image,
while the image as a whole does not. (With a uniform normal texture any global change would make
every patch abnormal and plain PatchCore would find it trivially.)

Its families (``KINDS``): global (rotated, rescaled, blur, contrast, colour), tiny (3-8 px spots
and 1-2 px scratches, every other one within a few pixels of the border) and local (the scratch
and spot of ``draw_defect``).

The benchmarks' second texture (``make_grain`` / ``make_speckle``, issue 13): a grey, fine,
random (not periodic) grain elongated along a random orientation, and, as its defect, a cluster
of fine speckle a few pixels wide with the grain's own mean and spread, so only its finer,
noisier texture sets it apart, not its brightness. Such a cluster is smaller than one stride-8
patch at 224 px.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, rotate

DEFECT_KINDS = ("scratch", "spot")


def make_texture(size: int, seed: int) -> np.ndarray:
    """A normal image of the tests' texture: uint8 RGB array (size, size, 3)."""
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


def draw_variant(image: np.ndarray) -> np.ndarray:
    """A copy of `image` with an acceptable mark the normal images lack: a new label, printed
    at the same place on every such product (a false alarm until the model learns it)."""
    size = image.shape[0]
    marked = image.copy()
    top, side = size // 2, size // 3
    marked[top : top + side, top : top + side] = (40, 60, 220)
    return marked


GRAIN_KINDS = ("speckle",)
GRAIN_GLOBAL_KINDS = ("coarse", "turned", "faint", "blurred")
GLOBAL_KINDS = ("rotated", "rescaled", "blur", "contrast", "colour")
TINY_KINDS = ("tiny_spot", "tiny_scratch")
LOCAL_KINDS = DEFECT_KINDS
KINDS = GLOBAL_KINDS + TINY_KINDS + LOCAL_KINDS
FAMILY = {k: "global" for k in GLOBAL_KINDS} | {k: "tiny" for k in TINY_KINDS}
FAMILY |= {k: "local" for k in LOCAL_KINDS} | {"speckle": "tiny"}

ANGLE = (-25.0, 25.0)  # stripe tilt from vertical, degrees
PERIOD = (6.0, 11.0)  # pixels
AMPLITUDE = (10.0, 30.0)
GRAIN = (3.0, 8.0)
GRID = 3


@dataclass(frozen=True)
class TextureParams:
    """Per-control-point parameters, each a (GRID, GRID) array."""

    angle: np.ndarray
    period: np.ndarray
    amplitude: np.ndarray
    grain: np.ndarray


def _params(rng: np.random.Generator) -> TextureParams:
    def draw(bounds: tuple[float, float]) -> np.ndarray:
        return rng.uniform(*bounds, (GRID, GRID))

    return TextureParams(draw(ANGLE), draw(PERIOD), draw(AMPLITUDE), draw(GRAIN))


def _weights(size: int) -> np.ndarray:
    """(GRID*GRID, size, size) soft partition of the image around the control points."""
    centres = (np.arange(GRID) + 0.5) * size / GRID
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    sigma = size / GRID / 2
    bumps = np.stack(
        [
            np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
            for cy in centres
            for cx in centres
        ]
    )
    return bumps / bumps.sum(axis=0, keepdims=True)


def _smooth(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.tensordot(values.reshape(-1), weights, axes=1)


def render(
    size: int, seed: int, params: TextureParams, cast: tuple[float, float, float] = (0, 0, 0)
) -> np.ndarray:
    """uint8 RGB (size, size, 3) texture: blended stripe patches + colour drift + grain."""
    rng = np.random.default_rng(seed + 10_000)
    weights = _weights(size)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    stripes = np.zeros((size, size))
    for k, (angle, period) in enumerate(
        zip(params.angle.ravel(), params.period.ravel(), strict=True)
    ):
        theta = np.deg2rad(angle)
        phase = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 1)
        stripes += weights[k] * np.sin(2 * np.pi * phase)
    coarse = rng.uniform(90, 160, (4, 4, 3)).astype(np.uint8)
    shading = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float64)
    amplitude = _smooth(params.amplitude, weights)[..., None]
    grain = _smooth(params.grain, weights)[..., None] * rng.normal(0, 1, (size, size, 3))
    image = shading + amplitude * stripes[..., None] + grain + np.asarray(cast, np.float64)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_normal(size: int, seed: int) -> np.ndarray:
    """A normal image."""
    return render(size, seed, _params(np.random.default_rng(seed)))


def make_global_defect(size: int, seed: int, kind: str) -> np.ndarray:
    """A normal image's parameters pushed, over the whole image, to one end of their range."""
    rng = np.random.default_rng(seed)
    params = _params(rng)
    side = rng.choice([0, 1])
    full = np.ones((GRID, GRID))
    if kind == "rotated":
        return render(
            size,
            seed,
            TextureParams(full * ANGLE[side], params.period, params.amplitude, params.grain),
        )
    if kind == "rescaled":
        return render(
            size,
            seed,
            TextureParams(params.angle, full * PERIOD[1], params.amplitude, params.grain),
        )
    if kind == "contrast":
        return render(
            size,
            seed,
            TextureParams(params.angle, params.period, full * AMPLITUDE[0], full * GRAIN[0]),
        )
    if kind == "colour":
        shift = rng.choice([-1, 1]) * 25.0
        return render(size, seed, params, cast=(shift, 0.0, -shift))
    if kind == "blur":
        image = render(size, seed, params).astype(np.float64)
        return np.clip(gaussian_filter(image, sigma=(1.2, 1.2, 0)), 0, 255).astype(np.uint8)
    raise ValueError(f"global defect kind must be one of {GLOBAL_KINDS}, got {kind!r}")


def draw_tiny_defect(image: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """A 3-8 px spot or a 1-2 px wide scratch; odd seeds place it within 6 px of the border."""
    rng = np.random.default_rng(seed)
    size = image.shape[0]
    mask = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(mask)
    margin = 2 if seed % 2 else size // 6
    x, y = (int(v) for v in rng.integers(margin, size - margin - 8, 2))
    if seed % 2:  # pin one coordinate to a border
        x = int(rng.choice([margin, size - margin - 8]))
    if kind == "tiny_spot":
        diameter = int(rng.integers(3, 9))
        pen.ellipse((x, y, x + diameter - 1, y + diameter - 1), fill=255)
    elif kind == "tiny_scratch":
        length = int(rng.integers(10, 24))
        angle = rng.uniform(0, np.pi)
        dx, dy = length * np.cos(angle), length * np.sin(angle)
        pen.line(
            (x, y, int(np.clip(x + dx, 0, size - 1)), int(np.clip(y + dy, 0, size - 1))),
            fill=255,
            width=int(rng.integers(1, 3)),
        )
    else:
        raise ValueError(f"tiny defect kind must be one of {TINY_KINDS}, got {kind!r}")
    defective = image.copy()
    defective[np.asarray(mask) > 0] = (25, 25, 25) if rng.random() < 0.5 else (235, 225, 60)
    return defective


def make_defect(size: int, seed: int, kind: str) -> np.ndarray:
    """One defective image of ``kind`` (any of KINDS)."""
    if kind in GLOBAL_KINDS:
        return make_global_defect(size, seed, kind)
    if kind in TINY_KINDS:
        return draw_tiny_defect(make_normal(size, seed), kind, seed)
    return draw_defect(make_normal(size, seed), kind, seed)[0]


def make_grain(size: int, seed: int) -> np.ndarray:
    """uint8 RGB grey grain: white noise smoothed more along one random direction than across."""
    return _grain(size, seed)


def _grain(
    size: int,
    seed: int,
    across: float = 0.7,
    along_scale: float = 1.0,
    turn: float = 0.0,
    amplitude: float = 28.0,
) -> np.ndarray:
    """make_grain's image, with its grain widths, orientation or contrast changed (the draws,
    and so every normal image, stay what they were)."""
    rng = np.random.default_rng(seed)
    pad = size // 2
    noise = rng.normal(0, 1, (size + 2 * pad, size + 2 * pad))
    grain = gaussian_filter(noise, sigma=(across, along_scale * rng.uniform(2.0, 3.5)))
    angle = rng.uniform(-30, 30) + turn
    grain = rotate(grain, angle, reshape=False, order=1)[pad:-pad, pad:-pad]
    shading = gaussian_filter(rng.normal(0, 1, (size, size)), sigma=size / 6)
    image = 128 + amplitude * grain / grain.std() + 6 * shading / (shading.std() + 1e-9)
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def make_grain_global(size: int, seed: int, kind: str) -> np.ndarray:
    """A grain image changed as a whole (GRAIN_GLOBAL_KINDS): a coarser grain, the grain turned
    across its normal range of orientations (+-30 degrees), blurred, or of half the contrast.
    Every patch alone is still grain; the image is not the category's."""
    if kind == "coarse":
        return _grain(size, seed, across=1.6, along_scale=1.8)
    if kind == "turned":
        return _grain(size, seed, turn=90.0)
    if kind == "faint":
        return _grain(size, seed, amplitude=14.0)
    if kind == "blurred":
        image = make_grain(size, seed).astype(np.float64)
        return np.clip(gaussian_filter(image, sigma=(1.2, 1.2, 0)), 0, 255).astype(np.uint8)
    raise ValueError(f"grain global defect kind must be one of {GRAIN_GLOBAL_KINDS}, got {kind!r}")


def make_speckle(size: int, seed: int) -> np.ndarray:
    """A grain image with one cluster of 3-6 px wide speckle blobs of the same mean and spread."""
    image = make_grain(size, seed).astype(np.float64)
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(12, size - 12, 2)
    mask = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(3, 7))):
        y, x = cy + rng.integers(-5, 6), cx + rng.integers(-5, 6)
        mask |= (yy - y) ** 2 + (xx - x) ** 2 <= rng.uniform(2.0, 3.5) ** 2
    local = image[..., 0][mask]
    speckle = rng.normal(local.mean(), image[..., 0].std(), mask.sum())
    image[mask] = np.clip(speckle, 0, 255)[:, None]
    return image.astype(np.uint8)
