"""The threshold a run's aggregate chose per category, as the review page and `fit --update`
both read it.

Like the other statement modules of common/store, these take a Session and never commit;
the caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.store.aggregate_schema import Threshold


@dataclass(frozen=True)
class CategoryThreshold:
    policy: str
    value: float


def category_threshold(session: Session, run_id: int, category: str) -> CategoryThreshold | None:
    """The threshold `patchq aggregate` last chose for the category; None before any aggregate."""
    row = session.execute(
        select(Threshold.policy, Threshold.value)
        .where(Threshold.run_id == run_id, Threshold.category == category)
        .order_by(Threshold.created_at.desc())
        .limit(1)
    ).first()
    return None if row is None else CategoryThreshold(row.policy, row.value)
