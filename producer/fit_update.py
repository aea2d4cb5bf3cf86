"""`patchq fit --update CATEGORY --from-run RUN`: teach a model its reviewed false alarms.

The images of the run that reviewers marked normal (and whose folder gives no label) are split,
seeded, into update images and held-out ones (--holdout). The update images' uncovered patches
join the latest model's memory bank and the images its whole-image parts do not cover become
those parts' exemplars (common.engine.bank_update); the result is stored as a new model
version: new runs score with it, old runs keep the model their images were pinned to.
Before/after figures come from the run's labelled images that did not go into the update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import roc_auc_score
from sqlalchemy import select
from sqlalchemy.orm import Session

from common.data.layouts import ImageRecord
from common.data.locations import Location, to_location
from common.engine.artifact import artifact_hash, load_artifact, save_artifact
from common.engine.bank_update import BankUpdate, image_scores, update_features, update_model
from common.engine.ensemble import is_ensemble
from common.engine.fit import split_holdout
from common.engine.patchcore import PatchCore, resolve_device
from common.errors import PatchqError
from common.settings import Settings
from common.store.connection import open_database
from common.store.model_rows import latest_model_id, load_model_bytes, store_model
from common.store.reviews import latest_verdicts
from common.store.run_rows import resolve_run
from common.store.schema import Image, Model, Score
from common.store.threshold_queries import category_threshold

NORMAL_QUANTILE = 0.99  # threshold when the run was not aggregated with this model


class UpdateError(PatchqError):
    """`fit --update` cannot run as asked."""


@dataclass(frozen=True)
class ReviewedImages:
    """The run's images of the category, by role in the update."""

    update: list[ImageRecord]  # reviewed normal, their patches go into the bank
    validation: list[ImageRecord]  # labelled, not in the update: before/after figures
    scored_by: set[int]  # model ids that scored the category in this run


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str


def run_update(
    *, category: str, from_run: str, holdout: float, seed: int, settings: Settings
) -> None:
    """Add the patches of `from_run`'s images reviewed normal to `category`'s latest model,
    holding `holdout` of them out (split by `seed`) for the before/after figures; store the
    result as a new version unless it adds nothing."""
    device = resolve_device(settings.device)
    with open_database(settings.database_url) as (_, sessions):
        with sessions() as session:
            run_id, run_name = resolve_run(session, from_run)
            model_id = latest_model_id(session, category)
            if model_id is None:
                raise UpdateError(
                    f"no model for category {category!r}; run `patchq fit --data ROOT "
                    f"--category {category}` first"
                )
            data = _single_model_bytes(session, model_id, category)
            images = reviewed_images(session, run_id, category, holdout, seed)
            model = load_artifact(data, str(device))
            threshold = _threshold(session, run_id, category, model_id, images, model)
        features = update_features(model, _paths(images.update), settings.batch_size)
        if features.skipped:
            reason = next(iter(features.skipped.values()))
            print(f"  skipped {len(features.skipped)} unreadable images, e.g. {reason}")
        result = update_model(model, features, device.type)
        print(describe_update(category, model_id, result, len(images.update)))
        print(compare(model, result.model, images, threshold, settings.batch_size))
        if not result.changed:
            print("nothing to add: the model already covers these images; model unchanged")
            return
        with sessions.begin() as session:
            new_id = _store(session, category, model_id, result, run_id)
        kept = f"run {run_name or run_id} keeps model {model_id}"
        print(f"stored as model {new_id}: new runs of {category} score with it ({kept})")


def _single_model_bytes(session: Session, model_id: int, category: str) -> bytes:
    """The latest model's file, which must be one bank: an ensemble's members each have theirs."""
    data = load_model_bytes(session, model_id)[0]
    if is_ensemble(data):
        raise UpdateError(
            f"model {model_id} of {category!r} is an ensemble; --update adds to one model's "
            "bank, so refit the ensemble (`patchq fit --ensemble-member ...`) instead"
        )
    return data


def reviewed_images(
    session: Session, run_id: int, category: str, holdout: float, seed: int
) -> ReviewedImages:
    """Split the run's reviewed-normal images into update / held out; collect validation."""
    verdicts = latest_verdicts(session, run_id, category)
    rows = session.execute(
        select(Image.id, Image.path, Image.split, Image.label, Image.defect_type, Image.model_id)
        .join(Score, Score.image_id == Image.id)
        .where(Image.run_id == run_id, Image.category == category)
        .order_by(Image.id)
    ).all()
    labelled: list[ImageRecord] = []
    reviewed_normal: list[ImageRecord] = []
    for row in rows:
        label = row.label
        if label is None and row.id in verdicts:
            label = 0 if verdicts[row.id] == "normal" else 1
        if label is None or (row.split == "train" and label == 0):
            continue  # unlabelled, or a train/good image that may be in the bank
        record = ImageRecord(
            to_location(row.path), category, row.split or "test", label, row.defect_type
        )
        (reviewed_normal if row.label is None and label == 0 else labelled).append(record)
    if not reviewed_normal:
        raise UpdateError(
            f"run {run_id} has no {category} image reviewed as normal; mark false alarms "
            f"with `patchq review {run_id}` first"
        )
    update, held_out = split_holdout(reviewed_normal, holdout, seed)
    return ReviewedImages(update, labelled + held_out, {row.model_id for row in rows})


def _threshold(
    session: Session,
    run_id: int,
    category: str,
    model_id: int,
    images: ReviewedImages,
    model: PatchCore,
) -> Threshold:
    """The aggregate's threshold when this model scored the run, else a held-out quantile."""
    chosen = category_threshold(session, run_id, category)
    if chosen is not None and images.scored_by == {model_id}:
        return Threshold(chosen.value, f"{chosen.policy}, from `patchq aggregate` of the run")
    if not len(model.calibration):
        raise UpdateError(f"model {model_id} has no held-out normals; aggregate the run first")
    value = float(np.quantile(model.calibration, NORMAL_QUANTILE))
    return Threshold(value, f"the model's held-out normal {NORMAL_QUANTILE:.0%} quantile")


def _paths(records: Sequence[ImageRecord]) -> list[Location]:
    return [r.path for r in records]


def describe_update(category: str, model_id: int, result: BankUpdate, n_images: int) -> str:
    lines = [
        f"{category}: model {model_id}, bank {result.bank_before:,} -> {result.bank_after:,} "
        f"patches: {result.added:,} of the {result.candidates:,} patches of {n_images} "
        f"reviewed-normal images lay beyond the coverage radius {result.radius:.4g}"
    ]
    if result.model.config.scorer != "patch":
        lines.append(
            "  whole-image exemplars added (images beyond a part's radius): "
            f"global {result.global_exemplars}, pixel {result.pixel_exemplars}"
        )
    return "\n".join(lines)


def compare(
    before: PatchCore,
    after: PatchCore,
    images: ReviewedImages,
    threshold: Threshold,
    batch_size: int,
) -> str:
    """Before/after figures on the held-out images, then on the update images themselves."""
    paths = _paths(images.validation)
    labels = {r.path: r.label for r in images.validation}
    old, new = image_scores(before, paths, batch_size), image_scores(after, paths, batch_size)
    readable = [p for p in paths if p in old and p in new]
    y = np.array([labels[p] for p in readable], np.int64)
    lines = [
        f"  threshold {threshold.value:.4g} ({threshold.source})",
        f"  held-out validation: {len(readable)} labelled images not used for the update "
        f"({int((y == 0).sum())} normal, {int((y == 1).sum())} defective)",
        "            AUROC  false alarms  defects flagged  median normal  median defect",
    ]
    for name, scores in (("before", old), ("after", new)):
        values = np.array([scores[p] for p in readable])
        lines.append(f"    {name:<6}  " + _figures(values, y, threshold.value))
    taught = _paths(images.update)
    old_t, new_t = image_scores(before, taught, batch_size), image_scores(after, taught, batch_size)
    above = [sum(s >= threshold.value for s in d.values()) for d in (old_t, new_t)]
    medians = [float(np.median(list(d.values()))) for d in (old_t, new_t)]
    lines.append(
        f"  the {len(taught)} update images (now in the bank, so not a fair test): "
        f"{above[0]} -> {above[1]} at or above the threshold, median score "
        f"{medians[0]:.4g} -> {medians[1]:.4g}"
    )
    return "\n".join(lines)


def _figures(scores: np.ndarray, labels: np.ndarray, threshold: float) -> str:
    """One row of the before/after table."""
    normal, defect = scores[labels == 0], scores[labels == 1]
    auroc = roc_auc_score(labels, scores) if len(normal) and len(defect) else None
    return (
        f"{'  n/a' if auroc is None else f'{auroc:.3f}'}  "
        f"{f'{int((normal >= threshold).sum())}/{len(normal)}':>12}  "
        f"{f'{int((defect >= threshold).sum())}/{len(defect)}':>15}  "
        f"{_median(normal):>13}  {_median(defect):>13}"
    )


def _median(values: np.ndarray) -> str:
    return f"{float(np.median(values)):.4g}" if len(values) else "n/a"


def _store(
    session: Session,
    category: str,
    model_id: int,
    result: BankUpdate,
    run_id: int,
) -> int:
    """Store the updated model; its validation says where it came from and its bank images."""
    columns = select(Model.backbone, Model.config, Model.validation)
    old = session.execute(columns.where(Model.id == model_id)).one()
    validation = {
        **(old.validation or {}),
        "bank_size": result.bank_after,
        "update": {
            "from_model": model_id,
            "from_run": run_id,
            "coverage_radius": result.radius,
            "patches_added": result.added,
            "global_exemplars_added": result.global_exemplars,
            "pixel_exemplars_added": result.pixel_exemplars,
        },
    }
    data = save_artifact(result.model, category, validation)
    return store_model(
        session,
        category=category,
        artifact_bytes=data,
        content_hash=artifact_hash(data),
        backbone=old.backbone,
        config=old.config,
        validation=validation,
        bank_size=result.bank_after,
    )
