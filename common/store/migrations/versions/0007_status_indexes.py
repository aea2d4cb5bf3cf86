"""Indexes that keep `patchq status` of a running run of millions of images quick (issue 12).

- images (run_id, updated_at): when an image of the run last changed (`run_activity`, which
  status asks while workers are live) is the end of this index instead of a scan of every
  image of the run.
- images (run_id, leased_by, lease_until) where leased_by is set: who holds which of the run's
  images (`held_images`, `run_activity`'s live leases) reads the few leased rows, where the
  (run_id, status, id) index made it visit every pending row of the run.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LEASED = sa.text("leased_by IS NOT NULL")


def upgrade() -> None:
    op.create_index(op.f("ix_images_run_id_updated_at"), "images", ["run_id", "updated_at"])
    op.create_index(
        op.f("ix_images_leased"),
        "images",
        ["run_id", "leased_by", "lease_until"],
        postgresql_where=LEASED,
        sqlite_where=LEASED,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_images_leased"), table_name="images")
    op.drop_index(op.f("ix_images_run_id_updated_at"), table_name="images")
