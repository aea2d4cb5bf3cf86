"""Leases on images (who holds an image and until when) and the workers' heartbeat table.

Plain ADD COLUMN and CREATE INDEX: both dialects do them in place, no table copy.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("device", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("batches_done", sa.Integer(), nullable=False),
        sa.Column("images_done", sa.Integer(), nullable=False),
        sa.Column("current_batch", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_node"), "workers", ["node"])
    op.add_column("images", sa.Column("leased_by", sa.String(length=255), nullable=True))
    op.add_column("images", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))
    op.create_index(op.f("ix_images_lease_until"), "images", ["lease_until"])


def downgrade() -> None:
    with op.batch_alter_table("images") as batch_op:  # SQLite drops columns by copying the table
        batch_op.drop_index(batch_op.f("ix_images_lease_until"))
        batch_op.drop_column("lease_until")
        batch_op.drop_column("leased_by")
    op.drop_index(op.f("ix_workers_node"), table_name="workers")
    op.drop_table("workers")
