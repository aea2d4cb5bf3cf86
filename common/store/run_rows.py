"""The runs table: creating a run, finding one by the name or id a user types, and where it
stands per category.

A run is what `patchq submit` creates and `patchq status`, `aggregate`, `report` and `review`
name; its progress is counted by the database from indexes, never by loading its images.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import PatchqError
from common.store.schema import Image, Run, Score


@dataclass(frozen=True)
class CategoryProgress:
    """Where one category of a run stands; scored_at bounds give the throughput."""

    category: str
    done: int
    failed: int
    pending: int
    first_scored_at: datetime | None
    last_scored_at: datetime | None

    @property
    def total(self) -> int:
        return self.done + self.failed + self.pending


class UnknownRunError(PatchqError):
    """A run reference (id or name) that is not in the database."""


def create_run(session: Session, name: str | None, source: str, batch_size: int) -> int:
    """A new run's id; look a named run up first with run_id_by_name (names are unique)."""
    run = Run(name=name, source=source, batch_size=batch_size)
    session.add(run)
    session.flush()
    return run.id


def resolve_run(session: Session, ref: str | int) -> tuple[int, str | None]:
    """(id, name) of a run given by name or id, as users type either."""
    text = str(ref).strip()
    row = session.execute(select(Run.id, Run.name).where(Run.name == text)).first()
    if row is None and text.isdigit():
        row = session.execute(select(Run.id, Run.name).where(Run.id == int(text))).first()
    if row is None:
        raise UnknownRunError(
            f"run {text!r} is not in the database; give a run id or name from `patchq status` "
            "or `patchq submit`, and check PATCHQ_DATABASE_URL"
        )
    return row.id, row.name


def run_id_by_name(session: Session, name: str) -> int | None:
    """The id of the run called `name`, so resubmitting a name continues that run."""
    return session.scalars(select(Run.id).where(Run.name == name)).first()


def run_progress(session: Session, run_id: int) -> list[CategoryProgress]:
    """Per category of the run (sorted): done/failed/pending counts and the scoring time span.

    Both are aggregates the database answers from indexes, (run_id, category, status) for the
    counts and (run_id, category, scored_at) for the span, so status stays quick on runs of
    millions of images.
    """
    counts: dict[str, dict[str, int]] = {}
    for category, status, count in session.execute(
        select(Image.category, Image.status, func.count())
        .where(Image.run_id == run_id)
        .group_by(Image.category, Image.status)
    ):
        counts.setdefault(category, {})[status] = count
    spans = {category: _scoring_span(session, run_id, category) for category in counts}
    return [
        CategoryProgress(
            category=category,
            done=by_status.get("done", 0),
            failed=by_status.get("failed", 0),
            pending=by_status.get("pending", 0),
            first_scored_at=spans[category][0],
            last_scored_at=spans[category][1],
        )
        for category, by_status in sorted(counts.items())
    ]


def _scoring_span(
    session: Session, run_id: int, category: str
) -> tuple[datetime | None, datetime | None]:
    """First and last scoring time of a category: min/max alone (no GROUP BY), which both
    dialects answer from the two ends of the (run_id, category, scored_at) index."""
    first, last = session.execute(
        select(func.min(Score.scored_at), func.max(Score.scored_at)).where(
            Score.run_id == run_id, Score.category == category
        )
    ).one()
    return first, last
