"""Whole-image scoring: a Gaussian model of pooled feature statistics of normal images.

PatchCore scores every patch by its nearest normal patch, so a defect that changes the whole
surface (orientation or density of a texture, blur, contrast, colour cast) goes unseen when each
patch, taken alone, still looks like some normal patch. What does change is the *distribution*
of patches in the image. Each image is summarised by the per-channel mean and standard
deviation of its patch features (the same features the memory bank holds, so fit needs no
extra backbone pass), and scored by its Mahalanobis distance to the normal images' summaries.

With tens of images and hundreds of statistics the sample covariance is singular; the
Ledoit-Wolf estimate shrinks it towards a scaled identity by the amount that minimises the
expected error. Statistics are standardised first so that the identity target treats every
channel alike instead of favouring the channels with the largest activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf

from common.errors import PatchqError


def pooled_statistics(patches: np.ndarray) -> np.ndarray:
    """(B, h, w, D) patch features -> (B, 2D) per-channel mean and std over the positions."""
    b, _, _, d = patches.shape
    flat = np.asarray(patches, np.float64).reshape(b, -1, d)
    return np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)


@dataclass(frozen=True)
class GlobalScorer:
    """Mahalanobis distance sqrt((x - mean)^T P (x - mean)) of an image's pooled statistics."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F), shrunk inverse covariance

    @classmethod
    def fit(cls, statistics: np.ndarray) -> GlobalScorer:
        """Fit on the pooled statistics (N, F) of normal images (N >= 2)."""
        stats = np.asarray(statistics, np.float64)
        if stats.ndim != 2 or len(stats) < 2:
            raise PatchqError(
                f"the global scorer needs at least 2 normal images, got {len(stats)}; "
                "add train/good images"
            )
        mean = stats.mean(axis=0)
        scale = stats.std(axis=0) + 1e-6
        shrunk = LedoitWolf(assume_centered=True).fit((stats - mean) / scale)
        precision = shrunk.precision_ / np.outer(scale, scale)
        return cls(mean.astype(np.float32), precision.astype(np.float32))

    def score(self, statistics: np.ndarray) -> np.ndarray:
        """(B, F) pooled statistics -> (B,) Mahalanobis distances."""
        diff = np.asarray(statistics, np.float64) - self.mean
        squared = np.einsum("bi,ij,bj->b", diff, self.precision.astype(np.float64), diff)
        return np.sqrt(np.maximum(squared, 0.0)).astype(np.float32)

    def check(self) -> None:
        """Raise if the arrays do not fit together (a damaged artifact)."""
        f = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if f < 1 or self.precision.shape != (f, f):
            raise PatchqError(
                f"global scorer arrays do not fit: mean {self.mean.shape}, "
                f"precision {self.precision.shape}; refit the model"
            )
