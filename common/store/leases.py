"""Leases: which worker node holds a pending image and until when, kept in the images rows.

A worker claims a batch's pending images for `Lease.seconds` and its heartbeat renews the claim
while it scores (worker.heartbeat). A lease that runs out means its holder is gone; the sweep
(worker.sweeper) puts such images back on the queue, and refills the queue of a run that has
pending images, no live lease and no activity for a lease period (a broker that lost its queue).

The holder is the Celery node name, not the process: the pool process that replaces one that
died on a batch may take that batch back at once instead of waiting for the lease to run out,
and the supervisor of a default worker, whose scoring process died, requeues what its node
holds at once (worker.supervisor).
Every statement here also runs on SQLite, where the in-process path leases to itself.
Times come from the clocks of the machines that write and sweep, so keep them in sync.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, func, or_, select, text, update
from sqlalchemy.orm import Session

from common.store.schema import Image, Run, utcnow

DEFAULT_LEASE_S = 60
_SWEEP_LOCK_KEY = 0x73776565  # "swee": one PostgreSQL advisory lock, one sweeper at a time


@dataclass(frozen=True)
class Lease:
    """Who claims images (a worker node) and for how long without a renewal."""

    holder: str
    seconds: int = DEFAULT_LEASE_S

    def until(self) -> datetime:
        return utcnow() + timedelta(seconds=self.seconds)


def _claimable(holder: str, now: datetime) -> ColumnElement[bool]:
    """Pending, and free: never leased, lease run out, or already ours."""
    return (Image.status == "pending") & or_(
        Image.leased_by.is_(None), Image.leased_by == holder, Image.lease_until < now
    )


@dataclass(frozen=True)
class BatchClaim:
    """What claiming a batch found: the batch's image rows (id order, as they were before the
    claim) and {id: claims so far} of the images it leased. `lost_on`: a worker was lost on
    this batch, so nothing was claimed and the batch is to be retried image by image."""

    images: list[Image]
    attempts: dict[int, int]
    lost_on: bool = False


def claim_batch(session: Session, ids: Sequence[int], lease: Lease) -> BatchClaim:
    """Read the batch's rows and lease its claimable images: two statements.

    A batch of several images of which one is pending and was claimed before without being
    finished (a worker was lost on it, or its write failed) is not claimed: such a batch is
    retried image by image, each claimed on its own, so one poison image cannot take its
    batchmates down with it. The read also gives the scorer its paths and models.
    """
    rows = select(Image).where(Image.id.in_(ids)).order_by(Image.id)
    # populate_existing: rows this session read before are read afresh, not from its cache
    images = list(session.scalars(rows.execution_options(populate_existing=True)))
    if len(ids) > 1 and any(i.status == "pending" and i.attempts > 0 for i in images):
        return BatchClaim(images, {}, lost_on=True)
    return BatchClaim(images, claim(session, ids, lease))


def claim(session: Session, ids: Sequence[int], lease: Lease) -> dict[int, int]:
    """Lease the claimable images of `ids` and count the claim; returns {id: claims so far}.

    Images done, failed or held by another live node are left alone (a duplicate delivery
    of a batch someone else is scoring costs nothing and counts nothing). On PostgreSQL a
    concurrent claim of the same rows waits for this one and then finds them taken. One
    statement (UPDATE ... RETURNING, on SQLite too).
    """
    rows = session.execute(
        update(Image)
        .where(Image.id.in_(ids), _claimable(lease.holder, utcnow()))
        .values(attempts=Image.attempts + 1, leased_by=lease.holder, lease_until=lease.until())
        .returning(Image.id, Image.attempts)
        .execution_options(synchronize_session=False)
    )
    return {image_id: attempts for image_id, attempts in rows}


def unclaim(session: Session, ids: Sequence[int], lease: Lease) -> None:
    """Take back our claim of still-pending `ids`: lease cleared, claim count down by one."""
    session.execute(
        update(Image)
        .where(Image.id.in_(ids), Image.status == "pending", Image.leased_by == lease.holder)
        .values(attempts=Image.attempts - 1, leased_by=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


def renew(session: Session, ids: Sequence[int], lease: Lease) -> None:
    """Push the expiry of our still-pending images of `ids` one lease period ahead."""
    session.execute(
        update(Image)
        .where(Image.id.in_(ids), Image.status == "pending", Image.leased_by == lease.holder)
        .values(lease_until=lease.until())
        .execution_options(synchronize_session=False)
    )


def release(session: Session, ids: Sequence[int]) -> None:
    """Clear the leases of `ids`: they are back on the queue, free for whoever takes them."""
    session.execute(
        update(Image)
        .where(Image.id.in_(ids))
        .values(leased_by=None, lease_until=None)
        .execution_options(synchronize_session=False)
    )


def try_sweep_lock(session: Session) -> bool:
    """Whether this transaction may sweep: on PostgreSQL one sweeper holds an advisory lock
    until it commits; SQLite serialises writers anyway, and a second sweep only duplicates
    messages, which claims make harmless."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(
        session.scalar(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _SWEEP_LOCK_KEY})
    )


def held_by(session: Session, holder: str) -> dict[int, list[int]]:
    """Pending images `holder` leases, by run (live or not: the caller knows it is gone)."""
    rows = session.execute(
        select(Image.run_id, Image.id)
        .where(Image.status == "pending", Image.leased_by == holder)
        .order_by(Image.run_id, Image.id)
    )
    return _by_run(rows.all())


def expired(session: Session, now: datetime) -> dict[int, list[int]]:
    """Pending images whose lease ran out, by run: their holder is gone."""
    rows = session.execute(
        select(Image.run_id, Image.id)
        .where(Image.status == "pending", Image.leased_by.is_not(None), Image.lease_until < now)
        .order_by(Image.run_id, Image.id)
    )
    return _by_run(rows.all())


def stalled(session: Session, now: datetime, idle_s: int) -> dict[int, list[int]]:
    """Pending images, by run, of runs with no live lease and no image touched for `idle_s`:
    nobody is working on them, so if the queue is empty too, the queue was lost."""
    idle_since = now - timedelta(seconds=idle_s)
    live = select(Image.run_id).where(
        Image.status == "pending", Image.leased_by.is_not(None), Image.lease_until >= now
    )
    quiet = (
        select(Image.run_id)
        .where(Image.run_id.in_(select(Image.run_id).where(Image.status == "pending")))
        .group_by(Image.run_id)
        .having(func.max(Image.updated_at) < idle_since)
    )
    rows = session.execute(
        select(Image.run_id, Image.id)
        .where(
            Image.status == "pending",
            Image.run_id.in_(quiet),
            Image.run_id.not_in(live),
        )
        .order_by(Image.run_id, Image.id)
    )
    return _by_run(rows.all())


def batch_sizes(session: Session, run_ids: Sequence[int]) -> dict[int, int]:
    """Each run's batch size, so requeued images travel in batches like the first time."""
    return dict(session.execute(select(Run.id, Run.batch_size).where(Run.id.in_(run_ids))).all())


@dataclass(frozen=True)
class HeldImages:
    """A run's pending images one node holds, for `patchq status`."""

    holder: str
    images: int
    lease_until: datetime  # the latest expiry among them: all are requeued soon after it


def held_images(session: Session, run_id: int) -> list[HeldImages]:
    """Who holds the run's pending images, live or not (status compares with heartbeats)."""
    rows = session.execute(
        select(Image.leased_by, func.count(), func.max(Image.lease_until))
        .where(Image.run_id == run_id, Image.status == "pending", Image.leased_by.is_not(None))
        .group_by(Image.leased_by)
        .order_by(Image.leased_by)
    )
    return [HeldImages(holder, count, until) for holder, count, until in rows]


@dataclass(frozen=True)
class RunActivity:
    """When an image of the run last changed, and how many of its images are leased now."""

    last_change: datetime | None
    live_leases: int


def run_activity(session: Session, run_id: int, now: datetime) -> RunActivity:
    """What `stalled` looks at, for one run: status uses it to say a refill is coming."""
    last_change = session.scalar(select(func.max(Image.updated_at)).where(Image.run_id == run_id))
    live = session.scalar(
        select(func.count()).where(
            Image.run_id == run_id,
            Image.status == "pending",
            Image.leased_by.is_not(None),
            Image.lease_until >= now,
        )
    )
    return RunActivity(last_change, live or 0)


def _by_run(rows: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = defaultdict(list)
    for run_id, image_id in rows:
        grouped[run_id].append(image_id)
    return dict(grouped)
