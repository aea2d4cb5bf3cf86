"""The few statements patchq runs on its results database.

Repository functions take a Session and never commit: the caller owns the transaction
(`with session_factory.begin() as session: ...`), so e.g. a batch's scores and its failures
land together or not at all. Writes are idempotent multi-row upserts on both SQLite and
PostgreSQL, because Celery delivers a batch at least once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from common.store.bulk import insert_images
from common.store.connection import QUERY_CHUNK, insert_statement
from common.store.schema import Image, Score, utcnow

PENDING_PAGE_BATCHES = 1024  # batches of pending ids read per query when enqueueing
_ARRAY_DTYPE = np.dtype("<f2")  # little-endian float16: half the bytes, same on every machine


class ImageRow(TypedDict):
    """One image to register in a run (paths as text, as the worker will open them)."""

    category: str
    path: str
    model_id: int
    split: NotRequired[str | None]
    label: NotRequired[int | None]
    defect_type: NotRequired[str | None]
    mask_path: NotRequired[str | None]


class ScoreRow(TypedDict):
    """One scored image; upsert_scores encodes the arrays and copies the image's category."""

    run_id: int
    image_id: int
    score: float
    patch_map: np.ndarray  # (h, w) patch distances
    embedding: NotRequired[np.ndarray | None]  # (C,) pooled features, for feature-space plots
    worker: str
    duration_ms: float


def encode_array(array: np.ndarray) -> bytes:
    """Row-major float16 bytes of `array`; the storage format of patch maps and embeddings."""
    return np.ascontiguousarray(array, dtype=_ARRAY_DTYPE).tobytes()


def decode_array(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array that encode_array stored (shape (-1,) for an embedding)."""
    return np.frombuffer(data, dtype=_ARRAY_DTYPE).reshape(shape).astype(np.float32)


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


def upsert_scores(session: Session, rows: Sequence[ScoreRow]) -> None:
    """Write a batch's scores with INSERT .. ON CONFLICT DO UPDATE and mark those images done.

    A redelivered batch overwrites its earlier rows (the newer values win) instead of adding
    duplicates. A key repeated within `rows` keeps its last row, since PostgreSQL refuses to
    update one row twice in a statement.
    """
    latest = {(row["run_id"], row["image_id"]): row for row in rows}
    if not latest:
        return
    image_ids = [image_id for _, image_id in latest]
    categories = dict(
        session.execute(select(Image.id, Image.category).where(Image.id.in_(image_ids))).all()
    )
    values = [_score_values(row, categories[row["image_id"]]) for row in latest.values()]
    statement = insert_statement(session, Score)
    written = [name for name in values[0] if name not in ("run_id", "image_id")]
    # One single-row statement run for every row (executemany), not one statement with a
    # VALUES entry per row: SQLAlchemy caches the compiled form and the driver batches the
    # rows, where compiling a fresh multi-row statement per batch took half the write time.
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["run_id", "image_id"],
            set_={name: statement.excluded[name] for name in written},
        ),
        values,
    )
    session.execute(
        update(Image)
        .where(Image.id.in_(image_ids))
        .values(status="done", error=None, leased_by=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


def _score_values(row: ScoreRow, category: str) -> dict[str, Any]:
    patch_map = np.asarray(row["patch_map"])
    if patch_map.ndim != 2:
        raise ValueError(f"patch_map must be 2-D (h, w), got shape {patch_map.shape}")
    embedding = row.get("embedding")
    return {
        "run_id": row["run_id"],
        "image_id": row["image_id"],
        "category": category,
        "score": float(row["score"]),
        "patch_map": encode_array(patch_map),
        "map_height": patch_map.shape[0],
        "map_width": patch_map.shape[1],
        "embedding": None if embedding is None else encode_array(embedding),
        "worker": row["worker"],
        "duration_ms": float(row["duration_ms"]),
        "scored_at": utcnow(),
    }
