"""The aggregator's tables: thresholds, metrics and predictions per (run, category, policy).

Kept apart from common/store/schema.py so the aggregator can evolve its tables without touching the
scoring tables; migration 0002 creates them. Aggregating again with the same policy replaces
that policy's rows, so the tables always hold one consistent answer per policy.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from common.store.schema import Base, UtcDateTime, utcnow

PREDICTION_ROLES = ("calibration", "evaluation", "unlabelled", "excluded")


class Threshold(Base):
    """The score above which images are flagged, and which images it was chosen on."""

    __tablename__ = "thresholds"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    category: Mapped[str] = mapped_column(String(128), primary_key=True)
    policy: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    calibration_set: Mapped[str] = mapped_column(Text)  # in words, e.g. "50% seeded split (20)"
    evaluation_set: Mapped[str] = mapped_column(Text)
    note: Mapped[str | None] = mapped_column(Text)  # when the policy's target was not met
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Metric(Base):
    """Figures on the evaluation set at a threshold; None where a figure is undefined."""

    __tablename__ = "metrics"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "category", "policy"],
            ["thresholds.run_id", "thresholds.category", "thresholds.policy"],
            ondelete="CASCADE",
        ),
    )

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    category: Mapped[str] = mapped_column(String(128), primary_key=True)
    policy: Mapped[str] = mapped_column(String(128), primary_key=True)
    n_images: Mapped[int] = mapped_column(Integer)  # scored images of the category
    n_flagged: Mapped[int] = mapped_column(Integer)  # predicted anomalous among them
    n_normal: Mapped[int] = mapped_column(Integer)  # evaluation set composition
    n_anomalous: Mapped[int] = mapped_column(Integer)
    auroc: Mapped[float | None] = mapped_column(Float)
    average_precision: Mapped[float | None] = mapped_column(Float)
    undefined_reason: Mapped[str | None] = mapped_column(Text)
    precision: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    specificity: Mapped[float | None] = mapped_column(Float)
    f1: Mapped[float | None] = mapped_column(Float)
    accuracy: Mapped[float | None] = mapped_column(Float)
    balanced_accuracy: Mapped[float | None] = mapped_column(Float)
    mcc: Mapped[float | None] = mapped_column(Float)
    tn: Mapped[int | None] = mapped_column(Integer)
    fp: Mapped[int | None] = mapped_column(Integer)
    fn: Mapped[int | None] = mapped_column(Integer)
    tp: Mapped[int | None] = mapped_column(Integer)
    pixel_auroc: Mapped[float | None] = mapped_column(Float)
    aupro: Mapped[float | None] = mapped_column(Float)
    report: Mapped[str | None] = mapped_column(Text)  # classification report as printed


class Prediction(Base):
    """is_anomaly per scored image under one policy, and the role the image played."""

    __tablename__ = "predictions"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "category", "policy"],
            ["thresholds.run_id", "thresholds.category", "thresholds.policy"],
            ondelete="CASCADE",
        ),
        Index(None, "run_id", "category", "policy", "is_anomaly"),
    )

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    policy: Mapped[str] = mapped_column(String(128), primary_key=True)
    category: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    is_anomaly: Mapped[bool] = mapped_column(Boolean)
    role: Mapped[str] = mapped_column(String(16))  # one of PREDICTION_ROLES
