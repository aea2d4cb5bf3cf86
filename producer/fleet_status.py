"""The workers part of `patchq status`: live and lost workers, and what waits on the lost ones.

Read from the workers table and the images' leases alone, like the rest of status. An image
held by a lost worker is not about to finish: status says when its lease runs out and the
sweep requeues it, and withholds the ETA meanwhile (see producer.status_command).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from common.store.leases import held_images, run_activity
from common.store.schema import utcnow
from common.store.workers import WorkerView, fleet, live_nodes

QUIET_AFTER_S = 15  # a run idle this long with live workers is not just between two batches


@dataclass(frozen=True)
class FleetReport:
    lines: list[str]
    waiting: bool  # pending images wait on a lost worker or on no worker at all: no ETA


def fleet_report(
    session: Session, run_id: int, pending: int, heartbeat_s: int, lease_s: int, queued: bool
) -> FleetReport:
    """Lines describing the workers and, for `run_id`, what its pending images wait on
    (`queued`: a broker is configured, so pending images wait for workers)."""
    views = fleet(session, heartbeat_s)
    live = live_nodes(views)
    now = utcnow()
    lines = [_summary(views), *(_worker_line(view, now) for view in views)]
    waiting = False
    for held in held_images(session, run_id):
        if held.holder in live:
            continue
        waiting = True
        lines.append(
            f"{held.images} images wait on lost worker {held.holder}: "
            + _requeue_when(held.lease_until, now, heartbeat_s, bool(live))
        )
    if queued and pending and not live:
        waiting = True
        lines.append(f"{pending} images pending and no live worker: start `patchq worker`")
    elif queued and pending and not waiting:
        quiet = _quiet_line(session, run_id, now, lease_s)
        waiting = quiet is not None
        lines += [quiet] if quiet else []
    return FleetReport(lines, waiting)


def _quiet_line(session: Session, run_id: int, now: datetime, lease_s: int) -> str | None:
    """Live workers, yet nothing of the run moves and nobody holds it: its batches are either
    queued behind other runs or were lost with the broker, which the sweep refills."""
    activity = run_activity(session, run_id, now)
    if activity.live_leases or activity.last_change is None:
        return None
    idle = (now - activity.last_change).total_seconds()
    if idle < QUIET_AFTER_S:
        return None
    refill = activity.last_change + timedelta(seconds=lease_s)
    when = "now" if refill <= now else f"at {refill:%H:%M:%S} UTC"
    return (
        f"nothing of this run moved for {idle:.0f} s and no worker holds its images: they wait "
        f"behind other batches, or the queue was lost and the workers refill it {when}"
    )


def _summary(views: list[WorkerView]) -> str:
    live = sum(view.live for view in views)
    lost = sum(view.lost for view in views)
    died = sum(view.worker.state == "died" for view in views)
    stopped = len(views) - live - lost - died
    restarted = f", {died} died and restarted" if died else ""
    return f"workers: {live} live, {lost} lost, {stopped} stopped{restarted} (seen in the last day)"


def _worker_line(view: WorkerView, now: datetime) -> str:
    worker = view.worker
    state = "live" if view.live else ("LOST" if view.lost else worker.state)
    seen = _ago(worker.last_seen, now)
    doing = f", now {worker.current_batch}" if view.live and worker.current_batch else ""
    return (
        f"  {worker.name:<30} {state:<7} {worker.device:<7} {worker.batches_done} batches, "
        f"{worker.images_done} images, last seen {seen}{doing}"
    )


def _requeue_when(lease_until: datetime, now: datetime, heartbeat_s: int, anyone: bool) -> str:
    if not anyone:
        return "requeued once a worker runs (start `patchq worker`)"
    if lease_until <= now:
        return f"lease ran out, requeued within {heartbeat_s} s"
    left = (lease_until - now).total_seconds() + heartbeat_s
    return f"requeued automatically within {left:.0f} s (at {lease_until:%H:%M:%S} UTC + sweep)"


def _ago(then: datetime, now: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"
