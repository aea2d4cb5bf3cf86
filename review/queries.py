"""What the review page reads: a run's categories, and one filtered, sorted page of images.

Everything is a bounded query (LIMIT/OFFSET on the (run, category) images), so a run of
millions of images costs the page no more memory than one page of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Select, and_, false, func, select
from sqlalchemy.orm import Session

from common.store.aggregate_schema import Prediction
from common.store.review_schema import Review
from common.store.reviews import latest_review_ids
from common.store.schema import Image, Model, Score
from common.store.score_rows import decode_array
from common.store.threshold_queries import CategoryThreshold, category_threshold

PAGE_SIZE = 24
SCALE_SAMPLE = 256  # images whose hottest patch sets a category's overlay colour scale
PREDICTED = ("anomalous", "normal")
REVIEWED = ("yes", "no")


@dataclass(frozen=True)
class Filters:
    """The page's filters; None means "any"."""

    category: str
    predicted: str | None = None  # one of PREDICTED
    reviewed: str | None = None  # one of REVIEWED
    defect_type: str | None = None


def run_categories(session: Session, run_id: int) -> list[dict[str, Any]]:
    """Per scored category: image, flagged and reviewed counts, and its defect types."""
    reviewed = dict(
        session.execute(
            select(Image.category, func.count())
            .join(Review, Review.image_id == Image.id)
            .where(Review.id.in_(latest_review_ids(run_id)))
            .group_by(Image.category)
        ).all()
    )
    result = []
    for category, images in session.execute(
        select(Score.category, func.count())
        .where(Score.run_id == run_id)
        .group_by(Score.category)
        .order_by(Score.category)
    ):
        threshold = category_threshold(session, run_id, category)
        flagged = None
        if threshold is not None:
            flagged = session.scalar(
                select(func.count()).where(
                    Prediction.run_id == run_id,
                    Prediction.category == category,
                    Prediction.policy == threshold.policy,
                    Prediction.is_anomaly,
                )
            )
        defect_types = session.scalars(
            select(Image.defect_type)
            .where(Image.run_id == run_id, Image.category == category)
            .where(Image.defect_type.is_not(None))
            .distinct()
            .order_by(Image.defect_type)
        )
        result.append(
            {
                "category": category,
                "images": images,
                "flagged": flagged,
                "reviewed": reviewed.get(category, 0),
                "defect_types": list(defect_types),
                "threshold": None if threshold is None else threshold.value,
                "policy": None if threshold is None else threshold.policy,
            }
        )
    return result


def image_page(session: Session, run_id: int, filters: Filters, page: int) -> dict[str, Any]:
    """One page of the category's images: flagged first, then by score, highest first."""
    threshold = category_threshold(session, run_id, filters.category)
    query = _filtered(_page_query(run_id, filters, threshold), filters)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    flagged = query.selected_columns.flagged
    rows = session.execute(
        query.order_by(flagged.desc(), Score.score.desc(), Image.id)
        .limit(PAGE_SIZE)
        .offset(page * PAGE_SIZE)
    ).all()
    return {
        "category": filters.category,
        "threshold": None if threshold is None else threshold.value,
        "policy": None if threshold is None else threshold.policy,
        "total": total,
        "page": page,
        "page_size": PAGE_SIZE,
        "items": [
            {
                "id": r.id,
                "name": r.path.replace("\\", "/").rsplit("/", 1)[-1],
                "score": r.score,
                "flagged": None if threshold is None else bool(r.flagged),
                "label": r.label,
                "defect_type": r.defect_type,
                "verdict": r.verdict,
                "reviewer": r.reviewer,
            }
            for r in rows
        ],
    }


def _page_query(run_id: int, filters: Filters, threshold: CategoryThreshold | None) -> Select:
    latest = (
        select(Review.image_id, Review.verdict, Review.reviewer)
        .where(Review.id.in_(latest_review_ids(run_id)))
        .subquery()
    )
    policy = "" if threshold is None else threshold.policy
    flagged = func.coalesce(Prediction.is_anomaly, false()).label("flagged")
    return (
        select(
            Image.id,
            Image.path,
            Image.label,
            Image.defect_type,
            Score.score,
            flagged,
            latest.c.verdict,
            latest.c.reviewer,
        )
        .join(Score, and_(Score.image_id == Image.id, Score.run_id == run_id))
        .outerjoin(
            Prediction,
            and_(
                Prediction.run_id == run_id,
                Prediction.image_id == Image.id,
                Prediction.policy == policy,
            ),
        )
        .outerjoin(latest, latest.c.image_id == Image.id)
        .where(Image.run_id == run_id, Image.category == filters.category)
    )


def _filtered(query: Select, filters: Filters) -> Select:
    columns = query.selected_columns
    if filters.predicted is not None:
        wanted = filters.predicted == "anomalous"
        query = query.where(columns.flagged == wanted)
    if filters.reviewed is not None:
        reviewed = columns.verdict.is_not(None)
        query = query.where(reviewed if filters.reviewed == "yes" else ~reviewed)
    if filters.defect_type is not None:
        query = query.where(Image.defect_type == filters.defect_type)
    return query


@dataclass(frozen=True)
class StoredImage:
    """What the overlay needs of one image: its file, its patch map, the model's geometry."""

    path: str
    patch_map: np.ndarray
    category: str
    model_config: dict[str, Any]


def stored_image(session: Session, run_id: int, image_id: int) -> StoredImage | None:
    """The image of this run with this id (None if it is not in the run or not scored)."""
    row = session.execute(
        select(
            Image.path,
            Image.category,
            Score.patch_map,
            Score.map_height,
            Score.map_width,
            Model.config,
        )
        .join(Score, and_(Score.image_id == Image.id, Score.run_id == Image.run_id))
        .join(Model, Model.id == Image.model_id)
        .where(Image.id == image_id, Image.run_id == run_id)
    ).first()
    if row is None:
        return None
    patch_map = decode_array(row.patch_map, (row.map_height, row.map_width))
    return StoredImage(row.path, patch_map, row.category, row.config)


def overlay_scale(session: Session, run_id: int, category: str) -> float:
    """Distance shown at full colour: twice the median hottest patch of a sample of the
    category's images, so a typical image is half-lit and a real defect saturates."""
    hottest = [
        float(decode_array(row.patch_map, (row.map_height, row.map_width)).max())
        for row in session.execute(
            select(Score.patch_map, Score.map_height, Score.map_width)
            .where(Score.run_id == run_id, Score.category == category)
            .order_by(Score.image_id)
            .limit(SCALE_SAMPLE)
        )
    ]
    median = float(np.median(hottest)) if hottest else 0.0
    return 2 * median if median > 0 else 1.0
