"""The aggregator's tables: thresholds, metrics and predictions per (run, category, policy).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "thresholds",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=128), nullable=False),
        sa.Column("policy", sa.String(length=128), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("calibration_set", sa.Text(), nullable=False),
        sa.Column("evaluation_set", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_thresholds_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "category", "policy", name=op.f("pk_thresholds")),
    )
    op.create_table(
        "metrics",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("category", sa.String(length=128), nullable=False),
        sa.Column("policy", sa.String(length=128), nullable=False),
        sa.Column("n_images", sa.Integer(), nullable=False),
        sa.Column("n_flagged", sa.Integer(), nullable=False),
        sa.Column("n_normal", sa.Integer(), nullable=False),
        sa.Column("n_anomalous", sa.Integer(), nullable=False),
        sa.Column("auroc", sa.Float(), nullable=True),
        sa.Column("average_precision", sa.Float(), nullable=True),
        sa.Column("undefined_reason", sa.Text(), nullable=True),
        sa.Column("precision", sa.Float(), nullable=True),
        sa.Column("recall", sa.Float(), nullable=True),
        sa.Column("specificity", sa.Float(), nullable=True),
        sa.Column("f1", sa.Float(), nullable=True),
        sa.Column("accuracy", sa.Float(), nullable=True),
        sa.Column("balanced_accuracy", sa.Float(), nullable=True),
        sa.Column("mcc", sa.Float(), nullable=True),
        sa.Column("tn", sa.Integer(), nullable=True),
        sa.Column("fp", sa.Integer(), nullable=True),
        sa.Column("fn", sa.Integer(), nullable=True),
        sa.Column("tp", sa.Integer(), nullable=True),
        sa.Column("pixel_auroc", sa.Float(), nullable=True),
        sa.Column("aupro", sa.Float(), nullable=True),
        sa.Column("report", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id", "category", "policy"],
            ["thresholds.run_id", "thresholds.category", "thresholds.policy"],
            name=op.f("fk_metrics_run_id_thresholds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "category", "policy", name=op.f("pk_metrics")),
    )
    op.create_table(
        "predictions",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("policy", sa.String(length=128), nullable=False),
        sa.Column("category", sa.String(length=128), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("is_anomaly", sa.Boolean(), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"],
            ["images.id"],
            name=op.f("fk_predictions_image_id_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id", "category", "policy"],
            ["thresholds.run_id", "thresholds.category", "thresholds.policy"],
            name=op.f("fk_predictions_run_id_thresholds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("run_id", "image_id", "policy", name=op.f("pk_predictions")),
    )
    op.create_index(
        op.f("ix_predictions_run_id_category_policy_is_anomaly"),
        "predictions",
        ["run_id", "category", "policy", "is_anomaly"],
    )


def downgrade() -> None:
    op.drop_table("predictions")
    op.drop_table("metrics")
    op.drop_table("thresholds")
