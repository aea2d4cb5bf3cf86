"""Put scores of different kinds on one scale: the held-out normal distribution of each.

A patch distance, a Mahalanobis distance and another backbone's patch distance have unrelated
units, so they are only combined after each is turned into "how many standard deviations above
the normal images the bank never saw": z = (s - mean) / std over the held-out normal scores
from fit. The z-score is used rather than median/IQR because fit holds out few normals (often
5-20): the IQR then rests on a handful of points, the standard deviation on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.errors import PatchqError

FUSIONS = ("max", "mean")


@dataclass(frozen=True)
class Normaliser:
    """z = (s - center) / scale, fitted on held-out normal scores."""

    center: float
    scale: float

    @classmethod
    def from_scores(cls, normal_scores: np.ndarray) -> Normaliser:
        scores = np.asarray(normal_scores, np.float64)
        if scores.size == 0:
            raise PatchqError(
                "score normalisation needs held-out normal images; fit with --holdout > 0"
            )
        center = float(scores.mean())
        spread = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        # One held-out image, or identical scores: fall back to the scores' own magnitude.
        scale = spread if spread > 1e-12 else max(abs(center), 1e-6)
        return cls(center, scale)

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        return ((np.asarray(scores, np.float64) - self.center) / self.scale).astype(np.float32)


def fuse(normalised: np.ndarray, how: str) -> np.ndarray:
    """Combine (n_parts, B) normalised scores into (B,) by their max or mean."""
    if how not in FUSIONS:
        raise PatchqError(f"fusion must be one of {FUSIONS}, got {how!r}")
    parts = np.asarray(normalised, np.float32)
    return parts.max(axis=0) if how == "max" else parts.mean(axis=0)
