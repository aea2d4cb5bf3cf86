"""Images and masks in the model's frame: the same resize (and crop) the backbone saw.

Patch maps cover the preprocessed image, so masks and overlays go through the model's own
`Preprocessing` rather than a re-implementation of its geometry.
"""

from __future__ import annotations

import numpy as np

from common.data.images import Preprocessing, load_rgb, open_image
from common.data.locations import Location


def model_frame_image(path: Location, preprocessing: Preprocessing) -> np.ndarray:
    """The image as the model saw it: float RGB in [0, 1], (S, S, 3)."""
    return _unnormalise(preprocessing.to_tensor(load_rgb(path)).numpy(), preprocessing)


def model_frame_mask(path: Location, preprocessing: Preprocessing) -> np.ndarray:
    """The ground-truth mask resized like its image: bool (S, S), True on the defect."""
    with open_image(path) as mask:
        binary = mask.convert("L").point(lambda v: 255 if v > 0 else 0).convert("RGB")
    return _unnormalise(preprocessing.to_tensor(binary).numpy(), preprocessing)[..., 0] > 0.5


def _unnormalise(tensor: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    mean = np.asarray(preprocessing.mean, np.float32)[:, None, None]
    std = np.asarray(preprocessing.std, np.float32)[:, None, None]
    return np.clip(tensor * std + mean, 0, 1).transpose(1, 2, 0)
