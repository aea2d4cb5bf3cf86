"""Pixel-level metrics from anomaly maps and ground-truth masks (MVTec AD protocol).

Pixel AUROC treats every pixel as a sample, so large defects dominate it; PRO (per-region
overlap, Bergmann et al. 2020) weights every connected defect region equally, which is why the
MVTec benchmark reports both. AUPRO is the area under PRO versus the pixel false-positive rate,
integrated up to FPR 0.3 and divided by 0.3 so that a perfect map scores 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from aggregator.metrics import MetricsError

AUPRO_FPR_LIMIT = 0.3


@dataclass(frozen=True)
class PixelMetrics:
    pixel_auroc: float | None
    aupro: float | None
    n_images: int
    undefined_reason: str | None = None


def pixel_metrics(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = AUPRO_FPR_LIMIT
) -> PixelMetrics:
    """Pixel AUROC and AUPRO of anomaly maps against same-sized masks (non-zero = defect)."""
    if len(maps) != len(masks):
        raise MetricsError(f"got {len(maps)} anomaly maps for {len(masks)} masks")
    for anomaly, mask in zip(maps, masks, strict=True):
        if anomaly.shape != mask.shape:
            raise MetricsError(f"anomaly map {anomaly.shape} and mask {mask.shape} differ in size")
    if not maps:
        return PixelMetrics(None, None, 0, "no images with masks")
    scores = np.concatenate([np.ravel(m) for m in maps]).astype(np.float64)
    if not np.isfinite(scores).all():
        raise MetricsError("anomaly maps contain NaN or infinite values; rescore those images")
    truth = np.concatenate([np.ravel(m) > 0 for m in masks])
    if truth.all() or not truth.any():
        reason = "no defect pixels in the masks" if not truth.any() else "no normal pixels"
        return PixelMetrics(None, None, len(maps), reason)
    return PixelMetrics(
        float(roc_auc_score(truth, scores)),
        aupro(maps, masks, fpr_limit),
        len(maps),
    )


def aupro(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], fpr_limit: float = AUPRO_FPR_LIMIT
) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit].

    Lowering the threshold through the sorted pixel scores, FPR grows by 1/n_normal per normal
    pixel and PRO (the mean over regions of the share of each region above threshold) by
    1/(size * n_regions) per region pixel, so the whole curve is two cumulative sums.
    """
    scores, normal_step, pro_step = [], [], []
    n_regions = 0
    for anomaly, mask in zip(maps, masks, strict=True):
        regions, count = ndimage.label(mask > 0)
        sizes = np.bincount(regions.ravel(), minlength=count + 1).astype(np.float64)
        weight = np.where(regions > 0, 1.0 / sizes[regions], 0.0)
        scores.append(np.ravel(anomaly))
        normal_step.append(np.ravel(regions == 0))
        pro_step.append(np.ravel(weight))
        n_regions += count
    all_scores = np.concatenate(scores).astype(np.float64)
    order = np.argsort(-all_scores, kind="stable")
    is_normal = np.concatenate(normal_step)[order]
    fpr = np.cumsum(is_normal) / is_normal.sum()
    pro = np.cumsum(np.concatenate(pro_step)[order]) / n_regions
    # Tied scores pass the threshold together: keep the curve point after the last of each tie.
    sorted_scores = all_scores[order]
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, fpr[last_of_tie]]
    pro = np.r_[0.0, pro[last_of_tie]]
    end = np.interp(fpr_limit, fpr, pro)
    inside = fpr < fpr_limit
    area = np.trapezoid(np.r_[pro[inside], end], np.r_[fpr[inside], fpr_limit])
    return float(area / fpr_limit)
