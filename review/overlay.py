"""The picture on a review card: the image as the model saw it, its anomaly map laid over it.

Drawn with PIL, SciPy and a Matplotlib colour map (imported when first needed) rather than
common.engine.anomaly_map, which needs torch: the review server scores nothing, so it stays
light. The geometry is the model's own (Preprocessing: resize, or the seed's resize-and-crop),
and the map is upsampled bilinearly and smoothed with the paper's sigma, as the report does.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from scipy.ndimage import gaussian_filter

from common.data.images import open_image
from common.data.locations import Location

PAPER_SIGMA = 4.0
OVERLAY_ALPHA = 0.45  # share of the heat colour in a fully anomalous pixel


def model_frame(path: Location, model_config: dict[str, Any]) -> Image.Image:
    """The RGB image resized (and centre-cropped) the way the model's preprocessing does."""
    size = int(model_config.get("image_size", 224))
    crop_from = model_config.get("crop_from")
    with open_image(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if crop_from is None:
        return image.resize((size, size), Image.BILINEAR)
    width, height = image.size
    scale = int(crop_from) / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), Image.BILINEAR)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def heat(patch_map: np.ndarray, size: int, scale: float) -> np.ndarray:
    """The anomaly map in [0, 1] at (size, size): upsampled, smoothed, divided by `scale`."""
    grid = Image.fromarray(np.ascontiguousarray(patch_map, np.float32), mode="F")
    upsampled = np.asarray(grid.resize((size, size), Image.BILINEAR), np.float32)
    smoothed = gaussian_filter(upsampled, sigma=PAPER_SIGMA, mode="nearest")
    return np.clip(smoothed / scale, 0.0, 1.0)


def render_png(
    path: Location, patch_map: np.ndarray, model_config: dict[str, Any], scale: float | None
) -> bytes:
    """PNG bytes of the image in the model's frame; with a `scale`, the anomaly map over it."""
    frame = model_frame(path, model_config)
    if scale is not None:
        from matplotlib import colormaps  # only the drawing needs it

        values = heat(patch_map, frame.width, scale)
        colours = colormaps["jet"](values)[..., :3]
        alpha = (OVERLAY_ALPHA * values)[..., None]
        blended = (1 - alpha) * np.asarray(frame, np.float32) / 255 + alpha * colours
        frame = Image.fromarray(np.round(blended * 255).astype(np.uint8))
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG")
    return buffer.getvalue()
