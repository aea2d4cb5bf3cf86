"""Named threshold policies: how the score above which an image is flagged gets chosen.

A policy is a plain string (`youden`, `target_recall:0.95`, `screening`, ...) so it can be
typed on the command line and stored next to the value it produced. Strings are parsed by a
table of known names, never evaluated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from aggregator.metrics import check_labels, check_scores, one_class_reason
from aggregator.policy_names import POLICY_HELP, PRESETS
from common.errors import PatchqError

# kind -> (lowest, highest, whether the bounds themselves are allowed) for the parameter.
PARAMETER_RANGES = {
    "target_recall": (0.0, 1.0, False, True),
    "target_precision": (0.0, 1.0, False, True),
    "normal_quantile": (0.0, 1.0, False, False),
    "contamination": (0.0, 100.0, False, False),
}


class PolicyError(PatchqError):
    """A policy string that is unknown, malformed, or cannot be applied to the data at hand."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy; `name` is the canonical string that is stored and printed."""

    kind: str
    parameter: float | None = None
    preset: str | None = None

    @property
    def name(self) -> str:
        """The canonical string; parse_policy(name) gives this policy back."""
        return self.preset or self.rule

    @property
    def rule(self) -> str:
        """The rule without preset name, e.g. target_recall:0.95."""
        return self.kind if self.parameter is None else f"{self.kind}:{self.parameter:g}"

    @property
    def label(self) -> str:
        """For people: a preset shows its rule too."""
        return f"{self.preset} ({self.rule})" if self.preset else self.rule


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen value; `note` says when the policy's target could not be met exactly."""

    value: float
    note: str | None = None


def parse_policy(text: str) -> Policy:
    """Policy from its string, with a one-line error listing the valid forms."""
    cleaned = text.strip().lower()
    preset = cleaned if cleaned in PRESETS else None
    kind, _, raw = PRESETS.get(cleaned, cleaned).partition(":")
    if kind in ("youden", "max_f1"):
        if raw:
            raise PolicyError(f"policy {text!r}: {kind} takes no parameter; use {kind!r}")
        return Policy(kind)
    if kind not in PARAMETER_RANGES:
        raise PolicyError(f"unknown threshold policy {text!r}; use {POLICY_HELP}")
    try:
        value = float(raw)
    except ValueError:
        raise PolicyError(f"policy {text!r} needs a number, e.g. {kind}:0.95") from None
    low, high, low_ok, high_ok = PARAMETER_RANGES[kind]
    inside = (value > low or (low_ok and value == low)) and (
        value < high or (high_ok and value == high)
    )
    if not math.isfinite(value) or not inside:
        bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
        raise PolicyError(f"policy {text!r}: {kind} must be in {bounds}, got {raw}")
    return Policy(kind, value, preset)


def choose_threshold(
    policy: Policy,
    scores: np.ndarray,
    labels: np.ndarray | None = None,
    normal_scores: np.ndarray | None = None,
) -> ThresholdChoice:
    """Apply `policy` to a calibration set.

    `scores`/`labels` are the calibration images (labels may be None for the unlabelled
    policies); `normal_scores` are held-out normal scores, used only by normal_quantile.
    """
    if policy.kind == "normal_quantile":
        return _normal_quantile(policy, normal_scores)
    scores = check_scores(scores, "calibration scores")
    if not len(scores):
        raise PolicyError(f"policy {policy.name}: no scored images to choose a threshold on")
    if policy.kind == "contamination":
        return ThresholdChoice(float(np.percentile(scores, 100 - policy.parameter)))
    if labels is None:
        raise PolicyError(
            f"policy {policy.name} needs labelled images; use normal_quantile:Q or "
            "contamination:PCT for unlabelled data"
        )
    labels = check_labels(labels, len(scores))
    reason = one_class_reason(labels)
    if reason and policy.kind != "target_recall":
        raise PolicyError(f"policy {policy.name} cannot be calibrated: {reason}")
    if policy.kind == "youden":
        return _youden(labels, scores)
    if policy.kind == "max_f1":
        return _max_f1(labels, scores)
    if policy.kind == "target_recall":
        return _target_recall(policy, labels, scores)
    return _target_precision(policy, labels, scores)


def _normal_quantile(policy: Policy, normal_scores: np.ndarray | None) -> ThresholdChoice:
    normals = check_scores(
        np.empty(0) if normal_scores is None else normal_scores, "held-out normal scores"
    )
    if not len(normals):
        raise PolicyError(
            f"policy {policy.name}: the model has no held-out normal scores; refit with "
            "--holdout > 0 or use contamination:PCT"
        )
    return ThresholdChoice(float(np.quantile(normals, policy.parameter)))


def _finite(threshold: float, scores: np.ndarray) -> float:
    """roc_curve's first threshold is +inf ("flag nothing"); store a real number instead."""
    return float(np.nextafter(scores.max(), np.inf)) if np.isinf(threshold) else float(threshold)


def _youden(labels: np.ndarray, scores: np.ndarray) -> ThresholdChoice:
    """Maximises J = TPR - FPR (sensitivity + specificity - 1)."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(tpr - fpr))
    return ThresholdChoice(_finite(thresholds[best], scores))


def _max_f1(labels: np.ndarray, scores: np.ndarray) -> ThresholdChoice:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    denominator = precision[:-1] + recall[:-1]
    f1 = np.divide(
        2 * precision[:-1] * recall[:-1],
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    return ThresholdChoice(float(thresholds[int(np.argmax(f1))]))


def _target_recall(policy: Policy, labels: np.ndarray, scores: np.ndarray) -> ThresholdChoice:
    """The highest threshold that still flags at least a share R of the anomalous images."""
    anomalous = np.sort(scores[labels == 1])[::-1]
    if not len(anomalous):
        raise PolicyError(
            f"policy {policy.name} cannot be calibrated: no anomalous images are labelled"
        )
    needed = math.ceil(policy.parameter * len(anomalous) - 1e-9)
    return ThresholdChoice(float(anomalous[max(needed, 1) - 1]))


def _target_precision(policy: Policy, labels: np.ndarray, scores: np.ndarray) -> ThresholdChoice:
    """The lowest threshold (most recall) whose precision reaches P; else the most precise one."""
    precision, _, thresholds = precision_recall_curve(labels, scores)
    precision = precision[:-1]  # the last point (recall 0) has no threshold
    meets = np.flatnonzero(precision >= policy.parameter - 1e-12)
    if len(meets):
        return ThresholdChoice(float(thresholds[meets.min()]))
    best = int(np.argmax(precision))
    return ThresholdChoice(
        float(thresholds[best]),
        note=(
            f"precision {policy.parameter:g} is not reached on the calibration set; "
            f"used the most precise threshold (precision {precision[best]:.3f})"
        ),
    )
