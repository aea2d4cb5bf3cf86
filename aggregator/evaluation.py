"""One category's evaluation: which images choose the threshold, which judge it, the figures.

Honesty rules, each printed with the figures so nobody has to guess:

* A threshold is chosen on a *calibration* set and judged on a different *evaluation* set.
  Labelled policies (youden, max_f1, target_*) split the run's labelled images 50/50, seeded and
  per class; normal_quantile calibrates on the normal images fit held out of the memory bank
  (stored in the model artifact) and evaluates on all the run's labelled images; contamination
  takes a percentile of the run's own scores (meant for unlabelled runs).
* Normal images of the training split (train/good) may be in the memory bank, where they score
  ~0; they get predictions but never count in metrics. When that leaves no labelled normal
  image (the seed layout), the fit's held-out normal scores stand in as the normal class.
* Images `fit --auto` chose the model on (every validation image of its fit, stored with the
  model) are left out of metrics too: a figure on them would be the best of several noisy
  estimates. For the same reason an --auto model's held-out normals never stand in as the
  normal class (they still set a normal_quantile threshold: that is what they are for).
* Too few labelled images to split (fewer than 2 per class) means calibration = evaluation;
  the output says the figures are optimistic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from aggregator.metrics import (
    RankingMetrics,
    ThresholdMetrics,
    predict,
    ranking_metrics,
    report_text,
    threshold_metrics,
)
from aggregator.pixel_metrics import PixelMetrics
from aggregator.policy_names import DEFAULT_LABELLED_POLICY, DEFAULT_UNLABELLED_POLICY
from aggregator.thresholds import Policy, ThresholdChoice, choose_threshold, parse_policy
from common.data.images import Preprocessing
from common.errors import PatchqError

SPLIT_SEED = 0


class AggregateError(PatchqError):
    """The run cannot be aggregated as asked (unknown run, nothing scored, mixed models)."""


@dataclass(frozen=True)
class CategoryData:
    """What the database holds for one category of a run: one entry per scored image, in
    image id order, as arrays (no per-image Python objects: a category may have millions)."""

    run_id: int
    category: str
    image_ids: np.ndarray
    scores: np.ndarray
    labels: np.ndarray  # 0 normal, 1 anomalous, -1 unknown
    in_train: np.ndarray  # bool: registered from a train split
    has_mask: np.ndarray  # bool: a ground-truth mask exists (paths: category_data.image_files)
    held_out_normals: np.ndarray  # fit's scores of normal images kept out of the bank
    preprocessing: Preprocessing
    n_failed: int
    n_pending: int
    # What the image score is, in words, for plot axes (the model's scorer decides).
    score_name: str = "image score"
    # The held-out normals' largest patch distance (s*) each: the anomaly maps' reference, in
    # patch-distance units whatever the scorer (empty when fit held no normals out).
    normal_patch_maxima: np.ndarray = field(default_factory=lambda: np.empty(0))
    n_review_labels: int = 0  # labels taken from reviewers' verdicts (no folder label)
    # ids of the images `fit --auto` chose this model on
    chose_model_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    # held-out normal scores that may stand in for a run's normal class in metrics: nothing
    # was chosen or fitted on them (for an --auto model, not its calibration normals)
    stand_in_normals: np.ndarray = field(default_factory=lambda: np.empty(0))
    model_choice: str = ""  # how `fit --auto` chose the model, in words ("" without --auto)

    # Masks over the category's images, computed once: a category may have millions, and
    # building the sets reads them several times.
    @cached_property
    def train_good(self) -> np.ndarray:
        """train/good images: possibly memory-bank images, never used to judge the bank."""
        return self.in_train & (self.labels == 0)

    @cached_property
    def chose_model(self) -> np.ndarray:
        """Images the model was chosen on (`fit --auto`'s validation images)."""
        return np.isin(self.image_ids, self.chose_model_ids)

    @cached_property
    def excluded(self) -> np.ndarray:
        """Images that get predictions but never count in metrics."""
        return self.train_good | self.chose_model

    @cached_property
    def eligible(self) -> np.ndarray:
        """Labelled images that may count in metrics."""
        return (self.labels >= 0) & ~self.excluded


@dataclass(frozen=True)
class EvaluationSets:
    """Calibration and evaluation samples (images, or fit's held-out normals) and their story."""

    roles: np.ndarray  # per image: calibration / evaluation / unlabelled / excluded
    calibration_scores: np.ndarray
    calibration_labels: np.ndarray | None
    evaluation_scores: np.ndarray
    evaluation_labels: np.ndarray
    calibration_set: str
    evaluation_set: str


@dataclass(frozen=True)
class CategoryResult:
    data: CategoryData
    policy: Policy
    choice: ThresholdChoice
    sets: EvaluationSets
    ranking: RankingMetrics | None
    at_threshold: ThresholdMetrics | None
    report: str | None
    predictions: np.ndarray  # is_anomaly per image
    pixel: PixelMetrics | None = None

    def summary_row(self) -> dict[str, Any]:
        """The figures of the summary table, CSV and metrics row (None = undefined)."""
        m = self.at_threshold
        rates = ("precision", "recall", "specificity", "f1", "accuracy", "balanced_accuracy")
        return {
            "category": self.data.category,
            "policy": self.policy.name,
            "threshold": self.choice.value,
            "n_images": len(self.predictions),
            "n_flagged": int(self.predictions.sum()),
            "n_normal": int((self.sets.evaluation_labels == 0).sum()),
            "n_anomalous": int((self.sets.evaluation_labels == 1).sum()),
            "auroc": self.ranking.auroc if self.ranking else None,
            "average_precision": self.ranking.average_precision if self.ranking else None,
            **{name: getattr(m, name) if m else None for name in rates},
            "mcc": m.mcc if m else None,
            **{name: getattr(m, name) if m else None for name in ("tn", "fp", "fn", "tp")},
            "pixel_auroc": self.pixel.pixel_auroc if self.pixel else None,
            "aupro": self.pixel.aupro if self.pixel else None,
            "calibration_set": self.sets.calibration_set,
            "evaluation_set": self.sets.evaluation_set,
            "note": self.choice.note,
        }


def resolve_policy(text: str | None, data: CategoryData) -> Policy:
    """The asked policy, or the default: youden with both classes labelled, else a quantile."""
    if text:
        return parse_policy(text)
    labels = _labelled_pool(data)[1]
    both = (labels == 0).any() and (labels == 1).any()
    return parse_policy(DEFAULT_LABELLED_POLICY if both else DEFAULT_UNLABELLED_POLICY)


def _labelled_pool(data: CategoryData) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(scores, labels, image index or -1, description) of every sample metrics may use."""
    index = np.flatnonzero(data.eligible)
    scores, labels = data.scores[index], data.labels[index]
    described = labelled_images(data, len(index))
    if not (labels == 0).any() and len(data.stand_in_normals):
        n = len(data.stand_in_normals)
        scores = np.r_[scores, data.stand_in_normals]
        labels = np.r_[labels, np.zeros(n, np.int64)]
        index = np.r_[index, np.full(n, -1)]
        described += f" + {n} normal images fit held out of the memory bank"
    return scores, labels, index, described


def labelled_images(data: CategoryData, n: int) -> str:
    """ "N labelled images of the run", and which images were left out of them and why."""
    left_out = [
        (int(data.train_good.sum()), "train/good images left out: maybe in the bank"),
        (
            int((data.chose_model & ~data.train_good & (data.labels >= 0)).sum()),
            "left out: `fit --auto` chose the model on them",
        ),
    ]
    reasons = "; ".join(f"{count} {why}" for count, why in left_out if count)
    return f"{n} labelled images of the run" + (f" ({reasons})" if reasons else "")


def build_sets(data: CategoryData, policy: Policy, seed: int = SPLIT_SEED) -> EvaluationSets:
    """Which samples choose the threshold and which judge it, per the module's rules."""
    roles = np.empty(len(data.labels), dtype=object)
    roles.fill("unlabelled")  # one shared string; np.full would build a text array of n first
    roles[data.labels >= 0] = "evaluation"
    roles[data.excluded] = "excluded"
    eligible = np.flatnonzero(data.eligible)
    labelled = (data.scores[eligible], data.labels[eligible])
    if policy.kind == "normal_quantile":
        n = len(data.held_out_normals)
        return EvaluationSets(
            roles,
            data.held_out_normals,
            None,
            *labelled,
            f"{n} normal images fit held out of the memory bank",
            labelled_images(data, len(eligible)),
        )
    if policy.kind == "contamination":
        usable = ~data.excluded
        return EvaluationSets(
            roles,
            data.scores[usable],
            None,
            *labelled,
            f"all {int(usable.sum())} scored images of the run (their own percentile)",
            labelled_images(data, len(eligible)) + " (the same images)",
        )
    scores, labels, index, described = _labelled_pool(data)
    if not len(labels):
        raise AggregateError(
            f"category {data.category!r} has no labelled images for policy {policy.name}; "
            f"use --policy {DEFAULT_UNLABELLED_POLICY} or contamination:PCT"
        )
    calibration = _stratified_half(labels, seed)
    if calibration is None:
        roles[index[index >= 0]] = "evaluation"
        return EvaluationSets(
            roles,
            scores,
            labels,
            scores,
            labels,
            described,
            "the same images: too few to split (need 2 per class), so figures are optimistic",
        )
    roles[index[(index >= 0) & calibration]] = "calibration"
    return EvaluationSets(
        roles,
        scores[calibration],
        labels[calibration],
        scores[~calibration],
        labels[~calibration],
        f"{int(calibration.sum())} of {len(labels)} = {described}; a seeded 50% split per class",
        f"the other {int((~calibration).sum())} of them",
    )


def _stratified_half(labels: np.ndarray, seed: int) -> np.ndarray | None:
    """Calibration mask: half of each class (seeded); None when a class has fewer than 2."""
    counts = [int((labels == c).sum()) for c in (0, 1)]
    if min(counts) < 2:
        return None
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(labels), bool)
    for c in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == c))
        chosen[members[: len(members) // 2]] = True
    return chosen


def evaluate_category(data: CategoryData, policy: Policy, seed: int = SPLIT_SEED) -> CategoryResult:
    """Threshold on the calibration set, metrics on the evaluation set, predictions for all."""
    sets = build_sets(data, policy, seed)
    choice = choose_threshold(
        policy, sets.calibration_scores, sets.calibration_labels, data.held_out_normals
    )
    ranking = at_threshold = report = None
    if len(sets.evaluation_labels):
        ranking = ranking_metrics(sets.evaluation_labels, sets.evaluation_scores)
        at_threshold = threshold_metrics(
            sets.evaluation_labels, sets.evaluation_scores, choice.value
        )
        report = report_text(sets.evaluation_labels, sets.evaluation_scores, choice.value)
    return CategoryResult(
        data,
        policy,
        choice,
        sets,
        ranking,
        at_threshold,
        report,
        predict(data.scores, choice.value),
    )
