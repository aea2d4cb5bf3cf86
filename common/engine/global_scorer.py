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

Taught exemplars (``patchq fit --update``, common/engine/bank_update.py): a Gaussian cannot
hold "normal, or this new variant" without also accepting what lies between, so reviewed
false alarms are kept as points beside it. Let d be an image's Mahalanobis distance to the
mean, t its distance to the nearest exemplar in the same whitened metric, r the median
held-out normal image's d (the part's coverage radius) and R = sqrt(2) r an exemplar's
reach. Within reach (t <= R) the image scores min(d, t); beyond every exemplar's reach it
scores d, exactly as before. Why sqrt(2) r: an image differs from its variant's centre by its
own variation, about r long as for held-out normals, so two images of one variant lie about
sqrt(2) r apart. So an exemplar vouches for its own variant (an image of it scores at most
R, within a normal image's range) and for nothing farther: a defect more than R from every
exemplar keeps its score exactly, however close to the exemplar's direction it lies. Scores
only go down, never up. The cost is a step at the edge of reach, from at most R inside to d
outside, so ranking changes only among images near an exemplar. Why not min(d, t)
everywhere: on synthetic/layouts.py's review layout the pixel statistics of held-out defects
(a red spot, a dark scratch) lay nearer a taught blue mark than the mean, and min(d, t) cut
their pixel distances by up to half (fused scores 26 -> 8); with the reach they keep them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from common.errors import PatchqError


def pooled_statistics(patches: np.ndarray) -> np.ndarray:
    """(B, h, w, D) patch features -> (B, 2D) per-channel mean and std over the positions."""
    b, _, _, d = patches.shape
    flat = np.asarray(patches, np.float64).reshape(b, -1, d)
    return np.concatenate([flat.mean(axis=1), flat.std(axis=1)], axis=1)


def image_statistics(images: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) preprocessed images -> (B, 4): per-channel mean, log fine-scale energy.

    The channel means move with a colour cast; the mean absolute Laplacian (over the interior,
    averaged over channels) is the energy at the finest scale, which blur removes first. Its
    log turns a multiplicative loss into a shift. The per-channel std is left out: contrast is
    already seen by the feature statistics, and on bench/accuracy.py adding it only cost accuracy.
    """
    x = images.detach().float()
    laplacian = _laplacian(x).abs().mean(dim=(1, 2, 3))
    stats = torch.cat([x.mean(dim=(2, 3)), torch.log(laplacian + 1e-6)[:, None]], dim=1)
    return stats.cpu().double().numpy()


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    """The 5-point Laplacian over the interior of (B, C, S, S), from shifted slices: the same
    sums as a grouped 3x3 convolution, which on CPU took 4-11 ms per image (224-384 px, one
    thread; a fifth of the default's scoring time) against 0.5-2 ms for the slices."""
    centre = x[:, :, 1:-1, 1:-1]
    vertical = x[:, :, :-2, 1:-1] + x[:, :, 2:, 1:-1]
    return vertical + x[:, :, 1:-1, :-2] + x[:, :, 1:-1, 2:] - 4 * centre


def vouched(distance: np.ndarray, nearest: np.ndarray, reach: float) -> np.ndarray:
    """Distances to the mean, lowered where an exemplar lies within reach (module notes)."""
    return np.where(nearest <= reach, np.minimum(distance, nearest), distance)


@dataclass(frozen=True)
class GlobalScorer:
    """Mahalanobis distance sqrt((x - mean)^T P (x - mean)) of an image's pooled statistics,
    or its distance to the nearest taught exemplar when smaller (see the module notes)."""

    mean: np.ndarray  # (F,)
    precision: np.ndarray  # (F, F), shrunk inverse covariance
    exemplars: np.ndarray | None = None  # (E, F) statistics of taught normal images
    radius: float = 0.0  # r: the median held-out normal's distance to the mean

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
        """(B, F) pooled statistics -> (B,) distances: to the mean, or an exemplar if nearer."""
        stats = np.asarray(statistics, np.float64)
        distance = np.sqrt(np.maximum(self._squared(stats, self.mean[None])[:, 0], 0.0))
        if self.exemplars is not None and len(self.exemplars):
            nearest = np.sqrt(np.maximum(self._squared(stats, self.exemplars).min(axis=1), 0.0))
            distance = vouched(distance, nearest, self.reach)
        return distance.astype(np.float32)

    @property
    def reach(self) -> float:
        """R = sqrt(2) r: how far an exemplar vouches (two images of one variant lie about
        that far apart, each a typical normal's variation r from the variant's centre)."""
        return float(np.sqrt(2.0) * self.radius)

    def _squared(self, stats: np.ndarray, centres: np.ndarray) -> np.ndarray:
        """(B, C) squared Mahalanobis distances of the statistics to each centre."""
        diff = stats[:, None, :] - np.asarray(centres, np.float64)[None]
        return np.einsum("bci,bci->bc", diff @ self.precision.astype(np.float64), diff)

    def with_exemplars(self, statistics: np.ndarray, radius: float) -> GlobalScorer:
        """This scorer taught the normal images' statistics (N, F) with coverage radius r.

        Greedy, farthest first, as the bank's coreset: the image scoring highest becomes an
        exemplar, scores shrink, repeat until every image scores at most r. The scorer grows by
        the number of distinct new variants, not by the number of images, and every taught
        image ends up scoring like a typical held-out normal or lower.
        """
        stats = np.asarray(statistics, np.float64)
        scorer = dataclasses.replace(self, radius=float(radius))
        while len(stats):
            scores = scorer.score(stats)
            farthest = int(np.argmax(scores))
            if scores[farthest] <= radius:
                break
            taught = stats[farthest][None]
            known = scorer.exemplars if scorer.exemplars is not None else taught[:0]
            exemplars = np.concatenate([known, taught]).astype(np.float32)
            scorer = dataclasses.replace(scorer, exemplars=exemplars)
        return scorer

    @property
    def n_exemplars(self) -> int:
        return 0 if self.exemplars is None else len(self.exemplars)

    def check(self) -> None:
        """Raise if the arrays do not fit together (a damaged artifact)."""
        f = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if f < 1 or self.precision.shape != (f, f):
            raise PatchqError(
                f"global scorer arrays do not fit: mean {self.mean.shape}, "
                f"precision {self.precision.shape}; refit the model"
            )
        exemplars = self.exemplars
        if exemplars is not None and (exemplars.ndim != 2 or exemplars.shape[1] != f):
            raise PatchqError(
                f"global scorer exemplars {exemplars.shape} do not fit its mean {self.mean.shape}"
                "; refit the model"
            )
