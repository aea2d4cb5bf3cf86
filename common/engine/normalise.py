"""Put scores of different kinds on one scale: the held-out normal distribution of each.

Two scales. The older one (artifact versions <= 3, fusions "max"/"mean") is the z-score below.
The default since version 4 is a calibrated tail probability, ``TailModel``: how often a
normal image the bank never saw scores at least this high. A z-score assumes every part's
normal scores have the same (Gaussian) tail, so a part whose normals have a heavy tail (s* on a
fine texture, whose border or grain patches fluctuate) raised false alarms that no other part
could outvote, and fused-max lost to plain PatchCore. Tail probabilities of different parts are
comparable by construction and combine with a proper test (``fuse_tail``).

A patch distance, a Mahalanobis distance and another backbone's patch distance have unrelated
units, so they are only combined after each is turned into "how many standard deviations above
the normal images the bank never saw": z = (s - mean) / std over the held-out normal scores
from fit. The z-score is used rather than median/IQR because fit holds out few normals (often
5-20): the IQR then rests on a handful of points, the standard deviation on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import chi2

from common.errors import PatchqError

FUSIONS = ("max", "mean")
TAIL_FUSIONS = ("min-p", "fisher")
TAIL_SCALES = ("std", "mean-excess")


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


@dataclass(frozen=True)
class TailModel:
    """log P(normal score >= s), fitted on held-out normal scores.

    Below the normals' median u it is the empirical tail (1 + #{x >= s}) / (n + 1), which never
    says 0. Above u the tail is extrapolated as exponential (a peaks-over-threshold fit with
    shape 0): P = P(u) exp(-(s - u) / beta). With the 5-20 held-out normals fit keeps, an
    empirical tail alone would give every score above the largest normal the same probability
    1/(n+1), so defects could no longer be ranked; the exponential keeps ranking them.

    beta, the tail's scale (``TAIL_SCALES``): "std", the standard deviation of every normal
    (the default since tail scales were named), or "mean-excess", their mean excess over u
    (what models saved before keep). The mean excess rests on the n/2 normals above u, 4 on
    bench/accuracy.py; a part whose few upper normals happened to lie close together got a thin
    tail, a new normal beyond them scored as a one-in-ten-thousand event, and under min-p that
    one part's chance outlier outranked defects another part found (stripes draw 4: `small`
    fused tiny 0.766 while its s* alone scored 0.969). The standard deviation uses all n.
    Measured on 14 draws of bench/accuracy.py in float32 (docs/accuracy.md): --auto's tiny defects
    0.907 -> 0.945 and 0.920 -> 0.940, whole-image defects level, elpv within 0.006.
    """

    normals: np.ndarray  # sorted held-out normal scores
    threshold: float  # u
    log_p_threshold: float  # log P(u)
    scale: float  # beta

    @classmethod
    def from_scores(cls, normal_scores: np.ndarray, scale: str = "std") -> TailModel:
        if scale not in TAIL_SCALES:
            raise PatchqError(f"tail scale must be one of {', '.join(TAIL_SCALES)}, got {scale!r}")
        scores = np.sort(np.asarray(normal_scores, np.float64))
        if scores.size == 0:
            raise PatchqError(
                "score calibration needs held-out normal images; fit with --holdout > 0"
            )
        threshold = float(np.median(scores))
        if scale == "std":
            spread = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
        else:
            excess = scores[scores > threshold] - threshold
            spread = float(excess.mean()) if excess.size else 0.0
        # Identical normals (or one): fall back to the scores' own magnitude, as Normaliser does.
        beta = spread if spread > 1e-12 else max(abs(threshold), 1e-6) * 0.1
        return cls(scores, threshold, float(cls._empirical(scores, np.array([threshold]))[0]), beta)

    @staticmethod
    def _empirical(normals: np.ndarray, scores: np.ndarray) -> np.ndarray:
        at_least = normals.size - np.searchsorted(normals, scores, side="left")
        return np.log((1.0 + at_least) / (normals.size + 1.0))

    def log_p(self, scores: np.ndarray) -> np.ndarray:
        """(B,) log tail probabilities of ``scores`` (natural log, <= 0)."""
        s = np.asarray(scores, np.float64)
        body = self._empirical(self.normals, s)
        tail = self.log_p_threshold - (s - self.threshold) / self.scale
        return np.where(s > self.threshold, np.minimum(tail, self.log_p_threshold), body)


def fuse_tail(log_p: np.ndarray, how: str) -> np.ndarray:
    """Combine (n_parts, B) log tail probabilities into (B,) scores -log p of one test.

    "min-p": the smallest part probability with Sidak's correction 1 - (1 - p_min)^k, so an
    image is as surprising as its most surprising part, discounted for having looked k times.
    "fisher": -2 sum log p_i ~ chi-square with 2k degrees of freedom, which adds up moderate
    evidence from several parts. Both return -log of the combined probability (higher = more
    anomalous), computed in log space so extreme scores do not underflow to ties.
    """
    if how not in TAIL_FUSIONS:
        raise PatchqError(f"tail fusion must be one of {TAIL_FUSIONS}, got {how!r}")
    parts = np.asarray(log_p, np.float64)
    k = parts.shape[0]
    if how == "fisher":
        return (-chi2.logsf(-2.0 * parts.sum(axis=0), 2 * k)).astype(np.float32)
    smallest = parts.min(axis=0)
    # log(1 - (1 - p)^k) = log(-expm1(k log1p(-p))); for tiny p it is log(k) + log(p).
    p = np.exp(smallest)
    with np.errstate(divide="ignore"):
        exact = np.log(-np.expm1(k * np.log1p(-np.minimum(p, 1.0 - 1e-16))))
    combined = np.where(p < 1e-12, np.log(k) + smallest, exact)
    return (-combined).astype(np.float32)
