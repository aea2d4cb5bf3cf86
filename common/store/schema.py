"""The SQL tables: the single source of truth for models, runs, images and their scores.

Changing a table here needs a new migration in common/migrations/versions/ (the aggregator's
metrics, thresholds and predictions tables arrive that way, as revision 0002).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

IMAGE_STATUSES = ("pending", "done", "failed")


def utcnow() -> datetime:
    """Timestamps are written by Python in UTC so both dialects store the same instant."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes from both dialects; SQLite alone would hand back naive ones."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Aware values are stored as UTC; naive ones are taken to be UTC already."""
        return value.astimezone(UTC) if value is not None and value.tzinfo else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base whose naming convention gives every constraint a stable name.

    Stable names let later migrations drop or alter constraints on both dialects.
    """

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Model(Base):
    """A fitted PatchCore model; the artifact lives here so any worker machine can load it."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(128), index=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    backbone: Mapped[str] = mapped_column(String(64))
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of artifact
    artifact: Mapped[bytes] = mapped_column(LargeBinary)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    bank_size: Mapped[int] = mapped_column(Integer)


class Run(Base):
    """One submission of images to score; resubmitting under the same name continues it."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(Text)  # what was submitted: data root, folder, manifest
    batch_size: Mapped[int] = mapped_column(Integer)


class Image(Base):
    """An image of a run and where it stands; the status index makes progress and failures cheap."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("run_id", "path"),
        CheckConstraint(f"status IN {IMAGE_STATUSES}", name="status"),
        Index(None, "run_id", "status", "id"),  # pending ids in order: keyset pages
        Index(None, "run_id", "category", "status"),
        Index(None, "lease_until"),
        # status of a running run: its last change, and who holds its few leased images
        Index(None, "run_id", "updated_at"),
        Index(
            "ix_images_leased",
            "run_id",
            "leased_by",
            "lease_until",
            postgresql_where=text("leased_by IS NOT NULL"),
            sqlite_where=text("leased_by IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    category: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    split: Mapped[str | None] = mapped_column(String(16))
    label: Mapped[int | None] = mapped_column(Integer)  # 0 normal, 1 anomalous, None unknown
    defect_type: Mapped[str | None] = mapped_column(String(128))
    mask_path: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    status: Mapped[str] = mapped_column(String(16), default="pending", server_default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The lease (common.store.leases): which worker node holds the image and until when.
    leased_by: Mapped[str | None] = mapped_column(String(255))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class Score(Base):
    """The result for one image of a run; (run_id, image_id) makes redelivered writes idempotent.

    patch_map and embedding are little-endian float16 bytes, row-major (see
    common.store.score_rows.encode_array); category is copied from images so that "top anomalies of
    a category in a run" is one range scan of the (run_id, category, score) index.
    """

    __tablename__ = "scores"
    __table_args__ = (
        Index(None, "run_id", "category", "score"),
        Index(None, "run_id", "category", "scored_at"),  # status: first/last scoring time
    )

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    category: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    patch_map: Mapped[bytes] = mapped_column(LargeBinary)
    map_height: Mapped[int] = mapped_column(Integer)
    map_width: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[bytes | None] = mapped_column(LargeBinary)
    worker: Mapped[str] = mapped_column(String(255))
    duration_ms: Mapped[float] = mapped_column(Float)
    scored_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
