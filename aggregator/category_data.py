"""Reading one category of a run from SQL: scores and labels for metrics as arrays, paths,
masks and maps on demand for the images a figure shows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from aggregator.evaluation import AggregateError, CategoryData
from aggregator.frames import model_frame_mask
from aggregator.metrics import check_scores
from aggregator.pixel_metrics import PixelMetrics, pixel_metrics
from common.data.locations import to_location
from common.engine.model_file import ModelReference, read_model_reference
from common.engine.normalise import TAIL_FUSIONS
from common.store.connection import QUERY_CHUNK
from common.store.image_rows import image_ids_by_path
from common.store.review_schema import VERDICT_LABELS
from common.store.reviews import latest_verdicts
from common.store.run_rows import run_progress
from common.store.schema import Image, Model, Score
from common.store.score_rows import decode_array

READ_CHUNK_ROWS = 100_000  # rows per fetch when streaming a category's scores


def scored_categories(session: Session, run_id: int) -> list[str]:
    return list(
        session.scalars(
            select(Score.category).where(Score.run_id == run_id).distinct().order_by(Score.category)
        )
    )


def load_category(session: Session, run_id: int, category: str) -> CategoryData:
    """Scores, labels and the model's held-out normals of one category's scored images.

    Only the columns metrics need are read, streamed READ_CHUNK_ROWS rows at a time into
    arrays (about 30 bytes per image), so a category of ten million images fits in a few
    hundred MB; paths and masks are fetched later for the few images a plot shows
    (`image_files`). Rows come in the database's order and are sorted by id here, which is
    cheaper than an ORDER BY over the join.
    An image's label is its folder's (train/good, test/<defect>, ...) and, where the folder
    says nothing, the latest verdict a reviewer gave it (`patchq review`).
    """
    statement = (
        select(
            Image.id,
            func.coalesce(Image.label, -1),
            case((Image.split == "train", True), else_=False),
            Image.mask_path.is_not(None),
            Score.score,
            Image.model_id,
        )
        .join(Score, Score.image_id == Image.id)
        .where(Score.run_id == run_id, Score.category == category)
        .execution_options(yield_per=READ_CHUNK_ROWS)
    )
    parts = [_columns(chunk) for chunk in session.execute(statement).partitions()]
    used = sorted(set().union(*(np.unique(part.pop(_MODEL)).tolist() for part in parts)))
    if len(used) != 1:
        raise AggregateError(
            f"category {category!r} of run {run_id} was scored by models {used}; "
            "aggregate needs one model per category, so submit a new run after refitting"
        )
    columns = _concatenate(parts)  # `parts` is emptied as it goes: one copy of each at a time
    order = np.argsort(columns[0], kind="stable")
    ids, labels, in_train, has_mask, scores = (columns.pop(0)[order] for _ in range(5))
    artifact, validation = session.execute(
        select(Model.artifact, Model.validation).where(Model.id == used[0])
    ).one()
    reference = read_model_reference(artifact)
    auto = (validation or {}).get("auto") or {}  # how `fit --auto` chose the model, if it did
    progress = {p.category: p for p in run_progress(session, run_id)}[category]
    labels, n_reviewed = _with_verdicts(ids, labels, latest_verdicts(session, run_id, category))
    return CategoryData(
        run_id=run_id,
        category=category,
        image_ids=ids,
        scores=check_scores(scores),
        labels=labels,
        in_train=in_train,
        has_mask=has_mask,
        held_out_normals=np.asarray(reference.calibration, np.float64),
        preprocessing=reference.preprocessing,
        n_failed=progress.failed,
        n_pending=progress.pending,
        score_name=score_name(reference),
        normal_patch_maxima=reference.normal_patch_maxima,
        n_review_labels=n_reviewed,
        chose_model_ids=_chose_model_ids(session, run_id, auto.get("selection_paths", [])),
        stand_in_normals=_stand_in_normals(reference.calibration, auto),
        model_choice=model_choice(auto),
    )


def model_choice(auto: dict[str, Any]) -> str:
    """How `fit --auto` chose the model, and on which labels, for the report."""
    if not auto:
        return ""
    if auto.get("chosen_on") == "synthesised":
        return (
            f"--auto chose {auto['chosen']} without labelled defects (on the normals' alignment "
            "and defects synthesised on them, which are no validation)"
        )
    sources = auto.get("labelled_defects")
    labels = (
        f" on {sources['folder']} labelled defects from the data folder and {sources['review']} "
        "marked defect in review"
        if sources
        else " on the labelled defects of its data folder"
    )
    return f"--auto chose {auto['chosen']}{labels}"


def _stand_in_normals(calibration: np.ndarray, auto: dict[str, Any]) -> np.ndarray:
    """Held-out normal scores that may stand in for a run's normal class: the model's
    calibration normals, but none of a model `fit --auto` chose (every held-out normal chose
    it, so they score in-sample), save the report half's that older --auto models stored
    (chosen on one half, reported on the other). A choice made without labels keeps them:
    they were only the background its synthesised copies were ranked against, and a run
    without labels has no other normals for its threshold."""
    if not auto or auto.get("chosen_on") == "synthesised":
        return np.asarray(calibration, np.float64)
    return np.asarray(auto.get("report_normal_scores", []), np.float64)


def _chose_model_ids(session: Session, run_id: int, paths: Sequence[str]) -> np.ndarray:
    """Ids of this run's images among `paths`, the images `fit --auto` chose the model on
    (matched by absolute path, as both fit and runs record them)."""
    return np.asarray(sorted(image_ids_by_path(session, run_id, paths).values()), np.int64)


def score_name(model: ModelReference) -> str:
    """The model's image score in words: what a histogram of it has on its axis."""
    if model.ensemble:
        return "ensemble score (mean of the members' z-scores vs held-out normals)"
    if model.scorer == "fused" and model.fusion in TAIL_FUSIONS:
        return f"fused image score (-log {model.fusion} tail probability vs held-out normals)"
    if model.scorer == "fused":
        return f"fused image score ({model.fusion} of the parts' z-scores vs held-out normals)"
    if model.scorer == "global":
        return "image score: Mahalanobis distance of pooled features"
    return f"image score: {_patch_score_name(model)}"


def _patch_score_name(model: ModelReference) -> str:
    """The patch part in words: its pooling, its distance and where its neighbours may be."""
    distance = "cosine patch distance" if model.distance == "cosine" else "patch distance"
    if model.top_share is not None:
        words = f"mean of the largest {model.top_share * 100:g}% {distance}s"
    elif model.num_neighbors > 1:
        words = f"reweighted max {distance} (s*, b={model.num_neighbors})"
    else:
        words = f"max {distance} (s*)"
    if model.position_radius is not None:
        words += f" to neighbours within {model.position_radius} cells"
    return words


# id, label, in_train, has_mask, score: the columns load_category keeps; then the model id.
_DTYPES = (np.int64, np.int64, np.bool_, np.bool_, np.float64, np.int64)
_MODEL = 5


def _columns(rows: Sequence[Sequence[object]]) -> list[np.ndarray]:
    """One chunk of rows as one array per column (the rows themselves are then dropped)."""
    return [
        np.fromiter((row[n] for row in rows), dtype, count=len(rows))
        for n, dtype in enumerate(_DTYPES)
    ]


def _concatenate(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
    """The kept columns of all chunks, each joined then its chunks freed, to bound the peak."""
    columns = []
    for n, dtype in enumerate(_DTYPES[:_MODEL]):
        columns.append(np.concatenate([part[n] for part in parts]) if parts else np.empty(0, dtype))
        for part in parts:
            part[n] = np.empty(0, dtype)
    return columns


@dataclass(frozen=True)
class ImageFiles:
    path: str
    mask_path: str | None


def image_files(session: Session, ids: Sequence[int]) -> dict[int, ImageFiles]:
    """Path and mask of the given images by id: for the few images a figure shows."""
    files: dict[int, ImageFiles] = {}
    for start in range(0, len(ids), QUERY_CHUNK):
        chunk = [int(i) for i in ids[start : start + QUERY_CHUNK]]
        for image_id, path, mask_path in session.execute(
            select(Image.id, Image.path, Image.mask_path).where(Image.id.in_(chunk))
        ):
            files[image_id] = ImageFiles(path, mask_path)
    return files


def _with_verdicts(
    ids: np.ndarray, labels: np.ndarray, verdicts: dict[int, str]
) -> tuple[np.ndarray, int]:
    """Folder labels, with reviewed verdicts filling the unlabelled images (`ids` sorted);
    and how many labels came from review."""
    if not verdicts:
        return labels, 0
    reviewed = np.fromiter(verdicts, np.int64, count=len(verdicts))
    values = np.array([VERDICT_LABELS.get(v, -1) for v in verdicts.values()], np.int64)
    at = np.minimum(np.searchsorted(ids, reviewed), max(len(ids) - 1, 0))
    scored = (ids[at] == reviewed) if len(ids) else np.zeros(len(reviewed), bool)
    at, values = at[scored], values[scored]
    fill = labels[at] == -1
    labels = labels.copy()
    labels[at[fill]] = values[fill]
    return labels, int(fill.sum())


def load_patch_maps(
    session: Session, run_id: int, image_ids: Sequence[int]
) -> dict[int, np.ndarray]:
    """Stored patch distance maps (h, w) by image id."""
    maps: dict[int, np.ndarray] = {}
    for start in range(0, len(image_ids), QUERY_CHUNK):
        chunk = [int(i) for i in image_ids[start : start + QUERY_CHUNK]]
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
    The maps are upsampled by the engine's own code, so torch is imported here, for
    categories with masks only.
    """
    if not (data.has_mask & data.eligible).any():
        return None
    from common.engine.anomaly_map import anomaly_map

    chosen = np.flatnonzero(data.eligible & ((data.labels == 0) | data.has_mask))
    ids = data.image_ids[chosen].tolist()
    maps = load_patch_maps(session, data.run_id, ids)
    files = image_files(session, ids)
    size = data.preprocessing.image_size
    anomaly_maps, masks = [], []
    for image_id in ids:
        anomaly_maps.append(anomaly_map(maps[image_id], (size, size)))
        mask_path = files[image_id].mask_path
        masks.append(
            model_frame_mask(to_location(mask_path), data.preprocessing)
            if mask_path
            else np.zeros((size, size), bool)
        )
    return pixel_metrics(anomaly_maps, masks)
