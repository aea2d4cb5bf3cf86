"""Reading and writing verdicts: append a row per decision, read the latest row per image.

Like the other statement modules of common.store, these take a Session and never commit; the
caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import Select, func, insert, select
from sqlalchemy.orm import Session

from common.errors import PatchqError
from common.store.image_rows import image_ids_by_path
from common.store.review_schema import VERDICT_LABELS, VERDICTS, Review
from common.store.schema import Image


class ReviewError(PatchqError):
    """A verdict that cannot be stored (unknown verdict, image not in the run)."""


def add_verdict(session: Session, run_id: int, image_id: int, verdict: str, reviewer: str) -> int:
    """Append one verdict and return its id; the image must belong to the run."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    in_run = session.scalar(select(Image.id).where(Image.id == image_id, Image.run_id == run_id))
    if in_run is None:
        raise ReviewError(f"image {image_id} is not in run {run_id}")
    review = Review(run_id=run_id, image_id=image_id, verdict=verdict, reviewer=reviewer)
    session.add(review)
    session.flush()
    return review.id


def latest_review_ids(run_id: int) -> Select[tuple[int]]:
    """The id of each reviewed image's latest verdict in the run (a subquery to join on)."""
    return (
        select(func.max(Review.id).label("id"))
        .where(Review.run_id == run_id)
        .group_by(Review.image_id)
    )


def latest_verdicts(session: Session, run_id: int, category: str | None = None) -> dict[int, str]:
    """image id -> its latest verdict in the run, for every reviewed image (of one category)."""
    query = select(Review.image_id, Review.verdict).where(Review.id.in_(latest_review_ids(run_id)))
    if category is not None:
        query = query.join(Image, Image.id == Review.image_id).where(Image.category == category)
    return {image_id: verdict for image_id, verdict in session.execute(query)}


def record_known_labels(
    session: Session, run_id: int, labels: Mapping[str, int], reviewer: str
) -> int:
    """Record labels known from elsewhere (absolute image path -> 0 normal / 1 defect, e.g. an
    inspection lab's answer key) as ``reviewer``'s verdicts on the run's images, once each: an
    image that already has a verdict by ``reviewer`` keeps it, so recording the same answers
    again adds nothing. Paths not in the run are ignored. Returns how many were recorded."""
    ids = image_ids_by_path(session, run_id, list(labels))
    done = set(
        session.scalars(
            select(Review.image_id).where(Review.run_id == run_id, Review.reviewer == reviewer)
        )
    )
    verdict_of = {label: verdict for verdict, label in VERDICT_LABELS.items()}
    rows = [
        {"run_id": run_id, "image_id": image_id, "verdict": verdict_of[labels[path]],
         "reviewer": reviewer}
        for path, image_id in ids.items()
        if image_id not in done
    ]  # fmt: skip
    if rows:
        session.execute(insert(Review), rows)
    return len(rows)


def reviewed_defect_paths(session: Session, category: str) -> list[str]:
    """Paths of the category's images whose latest verdict, over every run that scored them,
    is "defect": labelled defects for the category's next `fit --auto`."""
    latest = (
        select(func.max(Review.id))
        .join(Image, Image.id == Review.image_id)
        .where(Image.category == category)
        .group_by(Image.path)
    )
    query = (
        select(Image.path)
        .join(Review, Review.image_id == Image.id)
        .where(Review.id.in_(latest), Review.verdict == "defect")
        .order_by(Image.path)
    )
    return list(session.scalars(query))
