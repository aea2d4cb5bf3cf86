"""`aggregate_run`: per category of a run, a threshold, predictions and honest metrics, from SQL.

Honesty rules, each printed with the figures so nobody has to guess:

* A threshold is chosen on a *calibration* set and judged on a different *evaluation* set.
  Labelled policies (youden, max_f1, target_*) split the run's labelled images 50/50, seeded and
  per class; normal_quantile calibrates on the normal images fit held out of the memory bank
  (stored in the model artifact) and evaluates on all the run's labelled images; contamination
  takes a percentile of the run's own scores (meant for unlabelled runs).
* Normal images of the training split (train/good) may be in the memory bank, where they score
  ~0; they get predictions but never count in metrics. When that leaves no labelled normal
  image (the seed layout), the fit's held-out normal scores stand in as the normal class.
* Too few labelled images to split (fewer than 2 per class) means calibration = evaluation;
  the output says the figures are optimistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, insert, select
from sqlalchemy.orm import Session

from aggregator.exports import write_category_csv, write_summary_csv
from aggregator.frames import model_frame_mask
from aggregator.metrics import (
    RankingMetrics,
    ThresholdMetrics,
    check_scores,
    predict,
    ranking_metrics,
    report_text,
    threshold_metrics,
)
from aggregator.pixel_metrics import PixelMetrics, pixel_metrics
from aggregator.thresholds import Policy, ThresholdChoice, choose_threshold, parse_policy
from common.aggregate_schema import Metric, Prediction, Threshold
from common.anomaly_map import anomaly_map
from common.artifact import read_artifact
from common.database import decode_array, resolve_run, run_progress
from common.errors import PatchqError
from common.images import Preprocessing
from common.schema import Image, Model, Score

SPLIT_SEED = 0
DEFAULT_LABELLED_POLICY = "youden"
DEFAULT_UNLABELLED_POLICY = "normal_quantile:0.99"
DEFAULT_REPORTS_DIR = Path("patchq-reports")
_QUERY_CHUNK = 500  # ids per IN (...) list, well inside both dialects' parameter limits

Echo = Callable[[str], None]


class AggregateError(PatchqError):
    """The run cannot be aggregated as asked (unknown run, nothing scored, mixed models)."""


@dataclass(frozen=True)
class CategoryData:
    """What the database holds for one category of a run: one entry per scored image."""

    run_id: int
    category: str
    image_ids: np.ndarray
    paths: list[str]
    scores: np.ndarray
    labels: np.ndarray  # 0 normal, 1 anomalous, -1 unknown
    splits: list[str | None]
    mask_paths: list[str | None]
    held_out_normals: np.ndarray  # fit's scores of normal images kept out of the bank
    preprocessing: Preprocessing
    n_failed: int
    n_pending: int

    @property
    def excluded(self) -> np.ndarray:
        """train/good images: possibly memory-bank images, never used to judge the bank."""
        return np.array([s == "train" for s in self.splits], bool) & (self.labels == 0)

    @property
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


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    run_name: str | None
    results: list[CategoryResult]
    out_dir: Path
    summary_csv: Path
    category_csvs: dict[str, Path]


def default_out_dir(run_id: int, run_name: str | None) -> Path:
    return DEFAULT_REPORTS_DIR / (
        f"run-{run_id}" if run_name is None else f"run-{run_id}-{run_name}"
    )


def scored_categories(session: Session, run_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Score.category).where(Score.run_id == run_id).distinct().order_by(Score.category)
        )
    )


def load_category(session: Session, run_id: int, category: str) -> CategoryData:
    """Scores, labels and the model's held-out normals of one category's scored images."""
    rows = session.execute(
        select(
            Image.id,
            Image.path,
            Image.label,
            Image.split,
            Image.mask_path,
            Image.model_id,
            Score.score,
        )
        .join(Score, Score.image_id == Image.id)
        .where(Score.run_id == run_id, Score.category == category)
        .order_by(Image.id)
    ).all()
    model_ids = sorted({r.model_id for r in rows})
    if len(model_ids) != 1:
        raise AggregateError(
            f"category {category!r} of run {run_id} was scored by models {model_ids}; "
            "aggregate needs one model per category, so submit a new run after refitting"
        )
    artifact = read_artifact(
        session.scalars(select(Model.artifact).where(Model.id == model_ids[0])).one()
    )
    progress = {p.category: p for p in run_progress(session, run_id)}[category]
    return CategoryData(
        run_id=run_id,
        category=category,
        image_ids=np.array([r.id for r in rows], np.int64),
        paths=[r.path for r in rows],
        scores=check_scores(np.array([r.score for r in rows], np.float64)),
        labels=np.array([-1 if r.label is None else r.label for r in rows], np.int64),
        splits=[r.split for r in rows],
        mask_paths=[r.mask_path for r in rows],
        held_out_normals=np.asarray(artifact.calibration, np.float64),
        preprocessing=artifact.config.preprocessing(),
        n_failed=progress.failed,
        n_pending=progress.pending,
    )


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
    described = f"{len(index)} labelled images of the run"
    if data.excluded.any():
        described += f" ({int(data.excluded.sum())} train/good images left out: maybe in the bank)"
    if not (labels == 0).any() and len(data.held_out_normals):
        n = len(data.held_out_normals)
        scores = np.r_[scores, data.held_out_normals]
        labels = np.r_[labels, np.zeros(n, np.int64)]
        index = np.r_[index, np.full(n, -1)]
        described += f" + {n} normal images fit held out of the memory bank"
    return scores, labels, index, described


def build_sets(data: CategoryData, policy: Policy, seed: int = SPLIT_SEED) -> EvaluationSets:
    """Which samples choose the threshold and which judge it, per the module's rules."""
    roles = np.where(data.labels >= 0, "evaluation", "unlabelled").astype(object)
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
            f"{len(eligible)} labelled images of the run",
        )
    if policy.kind == "contamination":
        usable = ~data.excluded
        return EvaluationSets(
            roles,
            data.scores[usable],
            None,
            *labelled,
            f"all {int(usable.sum())} scored images of the run (their own percentile)",
            f"{len(eligible)} labelled images of the run (the same images)",
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


def load_patch_maps(
    session: Session, run_id: int, image_ids: Sequence[int]
) -> dict[int, np.ndarray]:
    """Stored patch distance maps (h, w) by image id."""
    maps: dict[int, np.ndarray] = {}
    for start in range(0, len(image_ids), _QUERY_CHUNK):
        chunk = [int(i) for i in image_ids[start : start + _QUERY_CHUNK]]
        for row in session.execute(
            select(Score.image_id, Score.patch_map, Score.map_height, Score.map_width).where(
                Score.run_id == run_id, Score.image_id.in_(chunk)
            )
        ):
            maps[row.image_id] = decode_array(row.patch_map, (row.map_height, row.map_width))
    return maps


def category_pixel_metrics(session: Session, data: CategoryData) -> PixelMetrics | None:
    """Pixel AUROC / AUPRO over the labelled images when the category has masks (threshold-free).

    Normal images count with an empty mask; a defective image without a mask is left out.
    """
    if not any(data.mask_paths[i] for i in np.flatnonzero(data.eligible)):
        return None
    chosen = [i for i in np.flatnonzero(data.eligible) if data.labels[i] == 0 or data.mask_paths[i]]
    maps = load_patch_maps(session, data.run_id, data.image_ids[chosen].tolist())
    size = data.preprocessing.image_size
    anomaly_maps, masks = [], []
    for i in chosen:
        anomaly_maps.append(anomaly_map(maps[int(data.image_ids[i])], (size, size)))
        mask_path = data.mask_paths[i]
        masks.append(
            model_frame_mask(Path(mask_path), data.preprocessing)
            if mask_path
            else np.zeros((size, size), bool)
        )
    return pixel_metrics(anomaly_maps, masks)


def compute_run(
    session: Session, run_id: int, policy_for: Callable[[str], str | None]
) -> list[CategoryResult]:
    """Every scored category's result; `policy_for(category)` gives its policy (None: default)."""
    categories = scored_categories(session, run_id)
    if not categories:
        raise AggregateError(
            f"run {run_id} has no scored images yet; check `patchq status {run_id}`"
        )
    results = []
    for category in categories:
        data = load_category(session, run_id, category)
        result = evaluate_category(data, resolve_policy(policy_for(category), data))
        results.append(replace(result, pixel=category_pixel_metrics(session, data)))
    return results


def store_result(session: Session, result: CategoryResult) -> None:
    """Replace this (run, category, policy)'s threshold, metrics and predictions."""
    data, policy = result.data, result.policy.name
    key = (data.run_id, data.category, policy)
    for table in (Prediction, Metric, Threshold):
        session.execute(
            delete(table).where(
                table.run_id == key[0], table.category == key[1], table.policy == key[2]
            )
        )
    row = result.summary_row()
    session.add(
        Threshold(
            run_id=data.run_id,
            category=data.category,
            policy=policy,
            value=result.choice.value,
            calibration_set=row["calibration_set"],
            evaluation_set=row["evaluation_set"],
            note=row["note"],
        )
    )
    session.flush()
    metric_columns = {c.name for c in Metric.__table__.columns}
    session.add(
        Metric(
            run_id=data.run_id,
            **{k: v for k, v in row.items() if k in metric_columns and k != "run_id"},
            undefined_reason=result.ranking.undefined_reason if result.ranking else None,
            report=result.report,
        )
    )
    session.flush()
    rows = [
        {
            "run_id": data.run_id,
            "image_id": int(image_id),
            "policy": policy,
            "category": data.category,
            "score": float(score),
            "is_anomaly": bool(flag),
            "role": str(role),
        }
        for image_id, score, flag, role in zip(
            data.image_ids, data.scores, result.predictions, result.sets.roles, strict=True
        )
    ]
    for start in range(0, len(rows), _QUERY_CHUNK):
        session.execute(insert(Prediction), rows[start : start + _QUERY_CHUNK])


def latest_policies(session: Session, run_id: int) -> dict[str, str]:
    """The policy each category was last aggregated with."""
    rows = session.execute(
        select(Threshold.category, Threshold.policy)
        .where(Threshold.run_id == run_id)
        .order_by(Threshold.created_at)
    )
    return {category: policy for category, policy in rows}


def aggregate_run(
    engine: Engine,
    run_id: int | str,
    policy: str | None = None,
    out_dir: Path | None = None,
    echo: Echo | None = print,
    policy_for: Callable[[str], str | None] | None = None,
) -> RunSummary:
    """Aggregate every category of a run (id or name): store results, write CSVs, print tables.

    `policy` applies to every category (None: youden where both classes are labelled, else
    normal_quantile:0.99); `policy_for` overrides it per category. `echo=None` prints nothing.
    """
    with Session(engine) as session, session.begin():
        run_id, run_name = resolve_run(session, run_id)
        results = compute_run(session, run_id, policy_for or (lambda _category: policy))
        for result in results:
            store_result(session, result)
    out = out_dir or default_out_dir(run_id, run_name)
    csvs = {r.data.category: write_category_csv(r, out) for r in results}
    summary_csv = write_summary_csv(results, out)
    if echo:
        for result in results:
            echo(describe_category(result))
        echo(summary_table(results))
        echo(f"predictions: {out}/<category>/predictions.csv; summary: {summary_csv}")
    return RunSummary(run_id, run_name, results, out, summary_csv, csvs)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def describe_category(result: CategoryResult) -> str:
    """The terminal block of one category: sets, threshold, classification report, matrix."""
    data, row = result.data, result.summary_row()
    lines = [
        f"\n== {data.category} — policy {result.policy.label}: threshold {result.choice.value:.4g}",
        f"   calibration (threshold chosen on): {row['calibration_set']}",
        f"   evaluation (figures below from):   {row['evaluation_set']}",
    ]
    if result.choice.note:
        lines.append(f"   note: {result.choice.note}")
    if data.n_failed or data.n_pending:
        lines.append(f"   not scored: {data.n_failed} failed, {data.n_pending} pending")
    if result.at_threshold is None:
        lines.append("   no labelled images to evaluate on")
    else:
        m = result.at_threshold
        reason = result.ranking.undefined_reason if result.ranking else None
        lines += [
            "",
            result.report.rstrip(),
            "",
            f"   AUROC {_fmt(row['auroc'])}  AP {_fmt(row['average_precision'])}"
            + (f"  ({reason})" if reason else ""),
            f"   specificity {_fmt(m.specificity)}  balanced accuracy {_fmt(m.balanced_accuracy)}  "
            f"MCC {_fmt(m.mcc)}",
            "   confusion matrix      predicted normal  predicted anomalous",
            f"     true normal       {m.tn:>16}  {m.fp:>19}",
            f"     true anomalous    {m.fn:>16}  {m.tp:>19}",
        ]
    if result.pixel is not None:
        lines.append(
            f"   pixel AUROC {_fmt(result.pixel.pixel_auroc)}  AUPRO@0.3 {_fmt(result.pixel.aupro)}"
            f"  ({result.pixel.n_images} labelled images, threshold-free)"
        )
    lines.append(
        f"   predictions: {row['n_flagged']} of {row['n_images']} scored images flagged anomalous"
    )
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    ("category", "category", None),
    ("policy", "policy", None),
    ("threshold", "threshold", 4),
    ("flagged", "n_flagged", None),
    ("images", "n_images", None),
    ("AUROC", "auroc", 3),
    ("AP", "average_precision", 3),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("F1", "f1", 3),
    ("px AUROC", "pixel_auroc", 3),
    ("AUPRO", "aupro", 3),
)


def summary_table(results: Sequence[CategoryResult]) -> str:
    """All categories in one aligned table (evaluation-set figures)."""
    cells = [[title for title, _, _ in SUMMARY_COLUMNS]]
    for result in results:
        row = result.summary_row()
        cells.append(
            [
                str(row[key]) if digits is None else _fmt(row[key], digits)
                for _, key, digits in SUMMARY_COLUMNS
            ]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(SUMMARY_COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\nsummary (figures on each category's evaluation set)\n" + "\n".join(lines)
