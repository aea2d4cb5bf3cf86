"""Whole-image scoring: a Gaussian model of pooled feature statistics of normal images.

PatchCore scores every patch by its nearest normal patch, so a defect that changes the whole
surface (orientation or density of a texture, blur, contrast, colour cast) goes unseen when each
patch, taken alone, still looks like some normal patch. What does change is the *distribution*
of patches in the image. Each image is summarised by the per-channel mean and standard
deviation of its patch features (the same features the memory bank holds, so fit needs no
extra backbone pass), and scored by its Mahalanobis distance to the normal images' summaries.

The backbone's features are built to ignore exactly two global changes: a uniform colour cast
(they respond to local contrast, not to absolute colour) and a slight blur (a softened edge is
still the same edge). Those are read from the input pixels instead (``image_statistics``: the
per-channel mean, and the fine-scale Laplacian energy), scored by a second Mahalanobis model of
the same kind, a separate part so that its few statistics are not drowned among the features'.

With tens of images and hundreds of statistics the sample covariance is singular; the
Ledoit-Wolf estimate shrinks it towards a scaled identity by the amount that minimises the
expected error. Statistics are standardised first so that the identity target treats every
channel alike instead of favouring the channels with the largest activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.covariance import LedoitWolf

from common.errors import PatchqError


def pooled_statistics(patches: np.ndarray) -> np.ndarray:
    """(B, h, w, D) patch features -> (B, 2D) per-channel mean and std over the positions."""
    b, _, _, d = patches.shape
    flat = np.asarray(patches, np.float64).reshape(b, -1, d)
    return np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def image_statistics(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) preprocessed images -> (B, 4): per-channel mean, log fine-scale energy.

    The channel means move with a colour cast; the mean absolute Laplacian (over the interior,
    averaged over channels) is the energy at the finest scale, which blur removes first. Its
    log turns a multiplicative loss into a shift. The per-channel std is left out: contrast is
    already seen by the feature statistics, and on tests/bench adding it only cost accuracy.
    """
    x = images.detach().float()
    kernel = _LAPLACIAN.to(x.device).expand(x.shape[1], 1, 3, 3)
    laplacian = F.conv2d(x, kernel, groups=x.shape[1]).abs().mean(dim=(1, 2, 3))
    stats = torch.cat([x.mean(dim=(2, 3)), torch.log(laplacian + 1e-6)[:, None]], dim=1)
    return stats.cpu().double().numpy()


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
