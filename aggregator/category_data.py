"""Reading one category of a run from SQL: scores and labels for metrics, maps on demand."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from aggregator.evaluation import AggregateError, CategoryData
from aggregator.frames import model_frame_mask
from aggregator.metrics import check_scores
from aggregator.pixel_metrics import PixelMetrics, pixel_metrics
from common.data.images import Preprocessing
from common.engine.anomaly_map import anomaly_map
from common.engine.artifact import ModelArtifact, read_artifact
from common.engine.ensemble import is_ensemble, read_reference
from common.engine.normalise import TAIL_FUSIONS
from common.store.database import decode_array, run_progress
from common.store.schema import Image, Model, Score

QUERY_CHUNK = 500  # ids per IN (...) list, well inside both dialects' parameter limits


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
    held_out, preprocessing, name, maxima = _reference(
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
        held_out_normals=np.asarray(held_out, np.float64),
        preprocessing=preprocessing,
        n_failed=progress.failed,
        n_pending=progress.pending,
        score_name=name,
        normal_patch_maxima=maxima,
    )


def _reference(data: bytes) -> tuple[np.ndarray, Preprocessing, str, np.ndarray]:
    """(held-out normal scores, preprocessing, score name, held-out s*) of a stored model,
    single or ensemble. An ensemble's score is not a patch distance: no s* reference."""
    if is_ensemble(data):
        held_out, preprocessing = read_reference(data)
        name = "ensemble score (mean of the members' z-scores vs held-out normals)"
        return held_out, preprocessing, name, np.empty(0)
    artifact = read_artifact(data)
    return (
        artifact.calibration,
        artifact.config.preprocessing(),
        score_name(artifact),
        normal_patch_maxima(artifact),
    )


def score_name(artifact: ModelArtifact) -> str:
    """The model's image score in words: what a histogram of it has on its axis."""
    config = artifact.config
    if config.scorer == "fused" and config.fusion in TAIL_FUSIONS:
        return f"fused image score (-log {config.fusion} tail probability vs held-out normals)"
    if config.scorer == "fused":
        return f"fused image score ({config.fusion} of the parts' z-scores vs held-out normals)"
    if config.scorer == "global":
        return "image score: Mahalanobis distance of pooled features"
    if config.num_neighbors > 1:
        return f"image score: reweighted max patch distance (s*, b={config.num_neighbors})"
    return "image score: max patch distance (s*)"


def normal_patch_maxima(artifact: ModelArtifact) -> np.ndarray:
    """The held-out normals' s* (largest patch distance), whichever score the model reports.

    Models with whole-image parts keep the raw s* of the held-out normals as the first column
    of ``part_calibration``; a patch-scorer model's calibration is s* itself. (With eq. 7
    reweighting, b > 1, s* is the reweighted maximum, slightly below the largest distance.)
    """
    if artifact.part_calibration is not None and len(artifact.part_calibration):
        return np.asarray(artifact.part_calibration[:, 0], np.float64)
    if artifact.config.scorer == "patch":
        return np.asarray(artifact.calibration, np.float64)
    return np.empty(0)


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
