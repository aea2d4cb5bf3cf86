"""Leases and heartbeats in SQL on both dialects: who may claim, what the sweep finds."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from common.store.fleet_schema import Worker
from common.store.image_rows import mark_failed
from common.store.leases import (
    Lease,
    claim,
    claim_batch,
    expired,
    held_by,
    held_images,
    release,
    renew,
    stalled,
    unclaim,
)
from common.store.schema import Image, utcnow
from common.store.workers import Beat, fleet, mark_died, mark_stopped, record_beat
from tests.test_database import _run_with_images

ALPHA = Lease("alpha@host", 60)
BETA = Lease("beta@host", 60)


def _expire(session: Session, ids: list[int]) -> None:
    """Make the leases on `ids` run out, as when their holder stopped renewing them."""
    past = utcnow() - timedelta(seconds=1)
    session.execute(update(Image).where(Image.id.in_(ids)).values(lease_until=past))


def test_a_live_lease_keeps_others_out_and_its_holder_may_reclaim(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
        assert claim(session, ids[:2], ALPHA) == {ids[0]: 1, ids[1]: 1}
    with sessions.begin() as session:
        assert claim(session, ids, BETA) == {ids[2]: 1}  # a duplicate delivery counts nothing
        assert claim(session, ids[:2], ALPHA) == {ids[0]: 2, ids[1]: 2}  # a new pool process
        mark_failed(session, run_id, {ids[0]: "bad"})
    with sessions.begin() as session:
        assert claim(session, ids[:1], BETA) == {}  # failed: nobody claims it


def test_a_claim_given_back_counts_nothing_and_frees_the_images(
    sessions: sessionmaker[Session],
) -> None:
    """What a worker does when the object store is down: the batch is not the images' fault."""
    with sessions.begin() as session:
        _, ids = _run_with_images(session, {"cell": 2})
        assert claim(session, ids, ALPHA) == {ids[0]: 1, ids[1]: 1}
        unclaim(session, ids[:1], BETA)  # not BETA's claim: nothing happens
        unclaim(session, ids, ALPHA)
        assert held_by(session, ALPHA.holder) == {}
        again = claim_batch(session, ids, BETA)  # as if never claimed: whole, first claims
        assert (again.lost_on, again.attempts) == (False, {ids[0]: 1, ids[1]: 1})


def test_a_batch_a_worker_was_lost_on_is_not_claimed_whole(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
        first = claim_batch(session, ids[:2], ALPHA)
        assert (first.attempts, first.lost_on) == ({ids[0]: 1, ids[1]: 1}, False)
        assert [i.id for i in first.images] == ids[:2]
        assert held_by(session, ALPHA.holder) == {run_id: ids[:2]}
        release(session, ids)  # ALPHA's process died: its supervisor gave the batch back
        again = claim_batch(session, ids, BETA)
        assert (again.attempts, again.lost_on) == ({}, True)  # to be retried image by image
        assert claim_batch(session, ids[:1], BETA).attempts == {ids[0]: 2}
        assert held_by(session, BETA.holder) == {run_id: ids[:1]}


def test_an_expired_lease_is_free_and_found_by_the_sweep(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
        claim(session, ids[:2], ALPHA)
        assert expired(session, utcnow()) == {}
        _expire(session, ids[:1])
        assert expired(session, utcnow()) == {run_id: ids[:1]}
        renew(session, ids[1:2], ALPHA)
        assert claim(session, ids[:2], BETA) == {ids[0]: 2}
        release(session, ids)
        assert expired(session, utcnow()) == {}
        assert claim(session, ids[1:2], BETA) == {ids[1]: 2}


def test_stalled_runs_have_no_live_lease_and_no_recent_activity(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
        later = utcnow() + timedelta(seconds=120)
        assert stalled(session, utcnow(), 60) == {}  # just registered: it is on the queue
        assert stalled(session, later, 60) == {run_id: ids}
        claim(session, ids[:1], Lease("alpha@host", 600))
        assert stalled(session, later, 60) == {}  # someone holds part of it: not stranded
        _expire(session, ids[:1])
        assert stalled(session, later, 60) == {run_id: ids}


def test_held_images_name_their_holders(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
        claim(session, ids[:2], ALPHA)
        claim(session, ids[2:], BETA)
        held = held_images(session, run_id)
    assert [(h.holder, h.images) for h in held] == [("alpha@host", 2), ("beta@host", 1)]


def test_heartbeats_tell_live_lost_and_stopped_workers(sessions: sessionmaker[Session]) -> None:
    def beat(name: str) -> Beat:
        node = name.partition("/")[0]
        return Beat(name, node, "host", 1, "cpu", utcnow(), 2, 64, None)

    with sessions.begin() as session:
        for name in ("a@h/1", "b@h/2", "c@h/3", "d@h/4"):
            record_beat(session, beat(name))
        record_beat(session, beat("a@h/1"))  # a second beat updates the row
        mark_stopped(session, "c@h/3")
        mark_died(session, "d@h/4")  # its supervisor requeued what it held
        mark_died(session, "c@h/3")  # a drained worker stays stopped
        old = utcnow() - timedelta(minutes=5)
        session.execute(update(Worker).where(Worker.name == "b@h/2").values(last_seen=old))
    with sessions() as session:
        views = {v.worker.name: v for v in fleet(session, heartbeat_s=5)}
    assert views["a@h/1"].live and not views["a@h/1"].lost
    assert views["b@h/2"].lost
    assert not views["c@h/3"].live and not views["c@h/3"].lost
    assert views["c@h/3"].worker.state == "stopped"
    assert not views["d@h/4"].live and not views["d@h/4"].lost
    assert views["d@h/4"].worker.state == "died"
