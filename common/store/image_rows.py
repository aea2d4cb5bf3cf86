"""The images table: registering a run's images, handing out the pending ones, and marking
the ones that cannot be scored.

An image row is a run's unit of work and its state (pending, done, failed); these statements
stream or page so that a run of millions of images is never held in memory. Leases on pending
images are leases.py's concern; writing their scores is score_rows.py's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NotRequired, TypedDict

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from common.store.bulk import insert_images
from common.store.connection import QUERY_CHUNK
from common.store.schema import Image

PENDING_PAGE_BATCHES = 1024  # batches of pending ids read per query when enqueueing


class ImageRow(TypedDict):
    """One image to register in a run (paths as text, as the worker will open them)."""

    category: str
    path: str
    model_id: int
    split: NotRequired[str | None]
    label: NotRequired[int | None]
    defect_type: NotRequired[str | None]
    mask_path: NotRequired[str | None]


def register_images(session: Session, run_id: int, rows: Iterable[ImageRow]) -> int:
    """Add images to a run, skipping paths it already has; returns how many were new.

    `rows` may be a stream: it is consumed once, one row at a time.
    """
    return insert_images(
        session,
        (
            {
                "run_id": run_id,
                "category": row["category"],
                "path": row["path"],
                "model_id": row["model_id"],
                "split": row.get("split"),
                "label": row.get("label"),
                "defect_type": row.get("defect_type"),
                "mask_path": row.get("mask_path"),
            }
            for row in rows
        ),
    )


def pending_image_ids(session: Session, run_id: int) -> list[int]:
    """Ids of the run's images still waiting for a score, in registration order."""
    return list(
        session.scalars(
            select(Image.id)
            .where(Image.run_id == run_id, Image.status == "pending")
            .order_by(Image.id)
        )
    )


def pending_id_batches(session: Session, run_id: int, batch_size: int) -> Iterator[list[int]]:
    """The run's pending ids in registration order, in batches of `batch_size`, read a page of
    PENDING_PAGE_BATCHES batches at a time (keyset paging on the (run_id, status) index), so a
    run of millions of images is never loaded whole."""
    last_id = 0
    page_size = batch_size * PENDING_PAGE_BATCHES
    while ids := list(
        session.scalars(
            select(Image.id)
            .where(Image.run_id == run_id, Image.status == "pending", Image.id > last_id)
            .order_by(Image.id)
            .limit(page_size)
        )
    ):
        yield from (ids[start : start + batch_size] for start in range(0, len(ids), batch_size))
        last_id = ids[-1]


def count_images(session: Session, run_id: int, status: str) -> int:
    """How many of the run's images have `status`, counted in the database."""
    return session.scalar(
        select(func.count()).where(Image.run_id == run_id, Image.status == status)
    )


def image_ids_by_path(session: Session, run_id: int, paths: Sequence[str]) -> dict[str, int]:
    """The run's image id of each of ``paths`` that it holds (absolute paths, as runs register
    them), queried QUERY_CHUNK at a time."""
    found: dict[str, int] = {}
    for start in range(0, len(paths), QUERY_CHUNK):
        chunk = paths[start : start + QUERY_CHUNK]
        query = select(Image.path, Image.id).where(Image.run_id == run_id, Image.path.in_(chunk))
        found |= dict(session.execute(query).tuples().all())
    return found


def images_by_id(session: Session, ids: Sequence[int]) -> list[Image]:
    """The image rows of a batch, in id order (ids that do not exist are simply absent)."""
    return list(session.scalars(select(Image).where(Image.id.in_(ids)).order_by(Image.id)))


def mark_failed(session: Session, run_id: int, reasons: Mapping[int, str]) -> None:
    """Mark images failed with their reasons in one statement; a done image stays done.

    Keeping done images done means a redelivered batch whose file vanished since cannot
    overwrite a result that was already written.
    """
    if not reasons:
        return
    session.execute(
        update(Image)
        .where(Image.run_id == run_id, Image.id.in_(list(reasons)), Image.status != "done")
        .values(
            status="failed",
            error=case(dict(reasons), value=Image.id),
            leased_by=None,
            lease_until=None,
        )
        .execution_options(synchronize_session=False)
    )


def retry_failed(session: Session, run_id: int) -> int:
    """Put the run's failed images back to pending with a fresh delivery count; returns how many.

    For after the cause is fixed (a file restored, a permission granted, a worker's GPU
    replaced): the next submit of the run enqueues them like any pending image.
    """
    result = session.execute(
        update(Image)
        .where(Image.run_id == run_id, Image.status == "failed")
        .values(status="pending", error=None, attempts=0)
        .execution_options(synchronize_session=False, preserve_rowcount=True)
    )
    return result.rowcount
