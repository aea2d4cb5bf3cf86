"""Indexes for runs of millions of images (issue 12).

- images (run_id, status, id) replaces (run_id, status): enqueueing pages through a run's
  pending ids in id order (keyset paging) is a range scan of it, where the old index made
  every page sort all the run's pending rows.
- scores (run_id, category, scored_at): `patchq status` reads each category's first and last
  scoring time from the two ends of it instead of scanning every score of the run.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_images_run_id_status_id"), "images", ["run_id", "status", "id"])
    op.drop_index(op.f("ix_images_run_id_status"), table_name="images")
    op.create_index(
        op.f("ix_scores_run_id_category_scored_at"), "scores", ["run_id", "category", "scored_at"]
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_scores_run_id_category_scored_at"), table_name="scores")
    op.create_index(op.f("ix_images_run_id_status"), "images", ["run_id", "status"])
    op.drop_index(op.f("ix_images_run_id_status_id"), table_name="images")
