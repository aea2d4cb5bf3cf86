"""The workers table: heartbeats in, the fleet as `patchq status` shows it out.

A worker is live while its last heartbeat is recent; one that stopped sending without saying
goodbye (state still "alive") is lost: killed, frozen or cut off from the database. A process
that drained says "stopped"; one that died under `patchq worker`'s supervisor is marked "died"
by the supervisor, which has requeued what it held.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from common.store.connection import insert_statement
from common.store.fleet_schema import Worker
from common.store.schema import utcnow

LOST_AFTER_BEATS = 3  # heartbeats missed before a worker counts as lost
SHOWN_FOR = timedelta(days=1)


@dataclass(frozen=True)
class Beat:
    """What one heartbeat says about its process."""

    name: str  # node/pid, as in scores.worker
    node: str  # Celery node name, as Flower shows it
    host: str
    pid: int
    device: str
    started_at: datetime
    batches_done: int
    images_done: int
    current_batch: str | None


def process_name(node: str, pid: int) -> str:
    """A scoring process's name: its Celery node and pid. Scores carry it (scores.worker), its
    heartbeat row is keyed by it, and its supervisor marks that row by it when it dies."""
    return f"{node}/{pid}"


def record_beat(session: Session, beat: Beat) -> None:
    """Insert or refresh the process's row (a heartbeat is an idempotent upsert)."""
    values = {**asdict(beat), "state": "alive", "last_seen": utcnow()}
    statement = insert_statement(session, Worker).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["name"],
            set_={key: statement.excluded[key] for key in values if key != "name"},
        )
    )


def mark_stopped(session: Session, name: str) -> None:
    """A clean exit (drain): the worker is gone on purpose, not lost."""
    _mark(session, name, "stopped")


def mark_died(session: Session, name: str) -> None:
    """A supervised process that died and whose supervisor requeued what it held and started
    another (worker.supervisor): nothing waits on it, so it is not lost either."""
    _mark(session, name, "died")


def _mark(session: Session, name: str, state: str) -> None:
    session.execute(
        update(Worker)
        .where(Worker.name == name, Worker.state == "alive")
        .values(state=state, current_batch=None, last_seen=utcnow())
    )


@dataclass(frozen=True)
class WorkerView:
    """A worker as `patchq status` shows it."""

    worker: Worker
    live: bool

    @property
    def lost(self) -> bool:
        return not self.live and self.worker.state == "alive"


def fleet(session: Session, heartbeat_s: int) -> list[WorkerView]:
    """Workers seen in the last day (older rows are history), live first, then by name."""
    now = utcnow()
    rows = session.scalars(select(Worker).where(Worker.last_seen >= now - SHOWN_FOR)).all()
    horizon = now - timedelta(seconds=heartbeat_s * LOST_AFTER_BEATS)
    views = [WorkerView(row, row.state == "alive" and row.last_seen >= horizon) for row in rows]
    return sorted(views, key=lambda v: (not v.live, v.worker.name))


def live_nodes(views: list[WorkerView]) -> set[str]:
    """Node names with at least one live process."""
    return {view.worker.node for view in views if view.live}
