"""The requeue sweep: puts back on the queue what nobody is working on any more.

Every worker's heartbeat runs it; on PostgreSQL an advisory lock lets one sweep at a time.
Two cases, both read from the database alone, so no producer needs to be alive:

- expired leases: the node that claimed those images stopped renewing (killed, frozen, cut
  off), so they go back on the queue in batches of their run's size;
- a lost queue: a run has pending images but no live lease, nothing of it moved for a lease
  period, and the queue is empty (a broker restarted without persistence): all its pending
  images are sent again.

Requeued images get their lease cleared and their row touched, so the next sweep does not
send them again while they wait on the queue. Sending twice is harmless anyway: a claim skips
images that are done or held by a live node.
"""

from __future__ import annotations

import logging

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from common.store.leases import batch_sizes, expired, held_by, release, stalled, try_sweep_lock
from common.store.schema import utcnow
from worker.broker import queue_length, send_batches

log = logging.getLogger(__name__)


def sweep(sessions: sessionmaker[Session], app: Celery, queue: str, lease_s: int) -> int:
    """Requeue orphaned and stranded images; returns how many were sent."""
    now = utcnow()
    with sessions.begin() as session:
        if not try_sweep_lock(session):
            return 0
        lost = expired(session, now)
        if lost:
            log.warning("requeueing %s: their leases expired", _describe(lost))
        if queue_length(app, queue) == 0:
            stranded = stalled(session, now, lease_s)
            if stranded:
                log.warning("refilling the empty queue %r with %s", queue, _describe(stranded))
            for run_id, ids in stranded.items():
                lost[run_id] = sorted({*lost.get(run_id, []), *ids})
        return _requeue(session, app, queue, lost)


def requeue_held(sessions: sessionmaker[Session], app: Celery, queue: str, holder: str) -> int:
    """Requeue at once the pending images `holder` leases, when its process is known to be gone
    (worker.supervisor saw it die): nobody need wait for those leases to run out."""
    with sessions.begin() as session:
        lost = held_by(session, holder)
        if lost:
            log.warning("requeueing %s: %s died holding them", _describe(lost), holder)
        return _requeue(session, app, queue, lost)


def _requeue(session: Session, app: Celery, queue: str, lost: dict[int, list[int]]) -> int:
    """Send `lost` ({run: image ids}) in batches of their run's size and clear their leases;
    returns how many images were sent."""
    sizes = batch_sizes(session, list(lost))
    for run_id, ids in lost.items():
        send_batches(app, run_id, ids, sizes[run_id], queue)
    release(session, [image_id for ids in lost.values() for image_id in ids])
    return sum(len(ids) for ids in lost.values())


def _describe(by_run: dict[int, list[int]]) -> str:
    return ", ".join(f"{len(ids)} images of run {run_id}" for run_id, ids in by_run.items())
