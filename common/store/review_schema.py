"""The reviews table: what people decided about scored images, one row per decision.

Rows are only ever inserted, never updated: two reviewers marking the same image at the same
moment both keep their row, and the history of who changed their mind stays queryable. The
verdict that counts is the image's latest row (highest id, which is also the latest insert on
both dialects). Migration 0006 creates the table.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from common.store.schema import Base, UtcDateTime, utcnow

VERDICTS = ("defect", "normal")  # normal = a false alarm when the image was flagged
VERDICT_LABELS = {"defect": 1, "normal": 0}  # a verdict as the label it gives an image


class Review(Base):
    """One verdict on one image of a run, by one reviewer (the login they used)."""

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint(f"verdict IN {VERDICTS}", name="verdict"),
        Index(None, "run_id", "image_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    verdict: Mapped[str] = mapped_column(String(16))
    reviewer: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
