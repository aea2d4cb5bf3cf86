"""Image-level metrics over (labels, scores) arrays; pure functions on top of scikit-learn.

Convention everywhere: label 1 = anomalous (the positive class), 0 = normal; an image is
predicted anomalous when its score is at or above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

from common.errors import PatchqError

CLASS_NAMES = ("normal", "anomalous")


class MetricsError(PatchqError):
    """Scores or labels that no metric can be computed from (NaN, wrong shape, bad labels)."""


@dataclass(frozen=True)
class RankingMetrics:
    """Threshold-free figures; None with a reason when only one class is present."""

    auroc: float | None
    average_precision: float | None
    undefined_reason: str | None = None


@dataclass(frozen=True)
class ThresholdMetrics:
    """Figures at one threshold. A rate whose denominator is empty is None, not a fake 0."""

    threshold: float
    precision: float | None
    recall: float | None
    specificity: float | None
    f1: float
    accuracy: float
    balanced_accuracy: float | None
    mcc: float
    tn: int
    fp: int
    fn: int
    tp: int

    @property
    def confusion(self) -> np.ndarray:
        """[[tn, fp], [fn, tp]]: rows are the true class, columns the prediction."""
        return np.array([[self.tn, self.fp], [self.fn, self.tp]])


def check_scores(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    """Scores as a float 1-D array; NaN or infinite scores are an error, not a silent drop."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        raise MetricsError(f"{what} must be one score per image, got shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise MetricsError(
            f"{int(bad.sum())} of {len(array)} {what} are NaN or infinite; "
            "rescore those images (`patchq submit` the run again) before aggregating"
        )
    return array


def check_labels(labels: np.ndarray, n_scores: int) -> np.ndarray:
    """Labels as an int 1-D array of 0/1 matching the scores."""
    array = np.asarray(labels)
    if array.shape != (n_scores,):
        raise MetricsError(f"got {array.shape} labels for {n_scores} scores")
    if not np.isin(array, (0, 1)).all():
        raise MetricsError("labels must be 0 (normal) or 1 (anomalous)")
    return array.astype(np.int64)


def one_class_reason(labels: np.ndarray) -> str | None:
    """Why ranking metrics are undefined for these labels, or None when both classes exist."""
    n_anomalous = int(labels.sum())
    n_normal = len(labels) - n_anomalous
    if n_normal and n_anomalous:
        return None
    if not len(labels):
        return "no labelled images"
    present = "normal" if n_normal else "anomalous"
    return f"only {present} images ({len(labels)}) are labelled; AUROC needs both classes"


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> RankingMetrics:
    """ROC-AUC and average precision (area under the PR curve)."""
    scores = check_scores(scores)
    labels = check_labels(labels, len(scores))
    reason = one_class_reason(labels)
    if reason:
        return RankingMetrics(None, None, reason)
    return RankingMetrics(
        float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores))
    )


def predict(scores: np.ndarray, threshold: float) -> np.ndarray:
    """is_anomaly per image: score at or above the threshold."""
    return check_scores(scores) >= threshold


def threshold_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> ThresholdMetrics:
    """Confusion matrix and the rates derived from it at `threshold`."""
    scores = check_scores(scores)
    labels = check_labels(labels, len(scores))
    if not len(labels):
        raise MetricsError("no labelled images to compute metrics on")
    predicted = (scores >= threshold).astype(np.int64)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    both_classes = one_class_reason(labels) is None
    return ThresholdMetrics(
        threshold=float(threshold),
        precision=(float(precision_score(labels, predicted, zero_division=0)) if tp + fp else None),
        recall=float(recall_score(labels, predicted, zero_division=0)) if tp + fn else None,
        specificity=tn / (tn + fp) if tn + fp else None,
        f1=float(f1_score(labels, predicted, zero_division=0)),
        accuracy=float(accuracy_score(labels, predicted)),
        balanced_accuracy=(
            float(balanced_accuracy_score(labels, predicted)) if both_classes else None
        ),
        # One value across truth and prediction: MCC is 0 by convention (sklearn warns).
        mcc=float(matthews_corrcoef(labels, predicted))
        if len(set(labels) | set(predicted)) > 1
        else 0.0,
        tn=tn,
        fp=fp,
        fn=fn,
        tp=tp,
    )


def report_text(labels: np.ndarray, scores: np.ndarray, threshold: float) -> str:
    """scikit-learn's classification report (per-class precision/recall/F1/support)."""
    scores = check_scores(scores)
    labels = check_labels(labels, len(scores))
    return classification_report(
        labels,
        (scores >= threshold).astype(np.int64),
        labels=[0, 1],
        target_names=list(CLASS_NAMES),
        digits=3,
        zero_division=0,
    )
