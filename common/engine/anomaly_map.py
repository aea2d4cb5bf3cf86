"""Full-resolution anomaly maps from the patch distance grid (PatchCore section 3.3).

The grid is upsampled bilinearly (never nearest-neighbour, which leaves blocky stride-sized
tiles) to the target size and smoothed with a Gaussian of sigma 4, as in the paper.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

PAPER_SIGMA = 4.0


def anomaly_map(
    patch_map: np.ndarray, size: tuple[int, int], sigma: float = PAPER_SIGMA
) -> np.ndarray:
    """Upsample a (h, w) patch distance map to ``size`` = (height, width) and smooth it."""
    grid = torch.from_numpy(np.ascontiguousarray(patch_map, dtype=np.float32))[None, None]
    upsampled = F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0]
    return gaussian_filter(upsampled.numpy(), sigma=sigma, mode="nearest")
