"""The scores table: a batch's results, one row per image however often the batch is delivered,
and the float16 format its patch maps and embeddings are stored in.

Celery delivers a batch at least once, so the write is an upsert keyed by (run, image) on both
dialects, and it marks those images done in the caller's transaction, so a batch's scores and its
failures land together or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NotRequired, TypedDict

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.store.connection import insert_statement
from common.store.schema import Image, Score, utcnow

_ARRAY_DTYPE = np.dtype("<f2")  # little-endian float16: half the bytes, same on every machine


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
