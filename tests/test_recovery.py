"""Faults with real processes and default settings: the run finishes, nothing twice, no human.

Each test starts real `patchq worker` processes (tests/cluster.py), submits a run and then
breaks something mid-run: a whole worker SIGKILLed, Redis restarted empty, PostgreSQL
restarted, an image that kills its scoring process every time, a rolling SIGTERM restart.
No manual command follows the fault; leases, heartbeats and the workers' sweep must finish
the run. Settings are patchq's defaults (lease 60 s, heartbeat 5 s, visibility 2 h) except
where the test waits for a lease: there a shorter one (tests.cluster.SHORT_LEASE, REFILL_LEASE
below) recovers the same way, sooner. Each test prints how long the run took to finish after
the fault (the figures in docs/reliability.md come from these lines, with default settings).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import pytest
from sqlalchemy import select

from common.store.fleet_schema import Worker
from common.store.leases import run_activity
from common.store.schema import Image, utcnow
from producer import status_command
from producer.fleet_status import QUIET_AFTER_S
from tests.cluster import (
    SHORT_LEASE,
    Cluster,
    ClusterFactory,
    Data,
    PrivatePostgres,
    assert_scored_exactly_once,
    free_port,
    until,
)

pytestmark = pytest.mark.integration

OUTAGE_S = 30  # PostgreSQL stays down this long, the short end of the 30-60 s
# The lost-queue refill waits a lease period after the run's last change; status must see the
# run quiet (QUIET_AFTER_S, 15 s) well before that, so this lease stays twice as long.
REFILL_LEASE = {"PATCHQ_LEASE_S": "30", "PATCHQ_HEARTBEAT_S": "2"}
POISON_SITE = '''"""Test fault: the process decoding the poison image dies (a decoder crash)."""
import os
import signal

import common.data.batches as batches

_decode = batches.decode_batch


def _poisoned(paths, *args, **kwargs):
    if any(str(path) == os.environ["POISON_IMAGE"] for path in paths):
        os.kill(os.getpid(), signal.SIGKILL)
    return _decode(paths, *args, **kwargs)


batches.decode_batch = _poisoned
'''


def _held_by(cluster: Cluster, run_id: int, node: str) -> list[int]:
    """Pending images of the run whose lease `node` holds."""
    with cluster.sessions() as session:
        return list(
            session.scalars(
                select(Image.id).where(
                    Image.run_id == run_id,
                    Image.status == "pending",
                    Image.leased_by.like(f"{node}@%"),
                )
            )
        )


def _freeze_holding_a_batch(cluster: Cluster, run_id: int, name: str) -> list[int]:
    """SIGSTOP worker `name` while it holds a claimed, unfinished batch; returns its images."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _held_by(cluster, run_id, name):
            cluster.pause(name, True)
            held = _held_by(cluster, run_id, name)
            if held:
                return held
            cluster.pause(name, False)  # it finished that batch in between: next one
        time.sleep(0.01)
    pytest.fail(f"{name} never held a batch")


def _quiet_s(cluster: Cluster, run_id: int) -> float:
    """Seconds since an image of the run last changed, 0 while someone holds a lease on it."""
    now = utcnow()
    with cluster.sessions() as session:
        activity = run_activity(session, run_id, now)
    if activity.live_leases or activity.last_change is None:
        return 0.0
    return (now - activity.last_change).total_seconds()


def _status(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """What `patchq status r` prints, run in this process with the cluster's settings (a new
    process would spend its first seconds importing, while the state it should show passes)."""
    monkeypatch.chdir(cluster.tmp)
    for name, value in cluster.env.items():
        if name.startswith("PATCHQ_"):
            monkeypatch.setenv(name, value)
    with contextlib.redirect_stdout(io.StringIO()) as output:
        assert status_command.run(argparse.Namespace(run_ref="r", watch=False)) == 0
    return output.getvalue()


def _recovered(cluster: Cluster, run_id: int, fault: str, fault_at: float) -> None:
    """Wait for the run to finish; print the seconds since the fault (`fault_at`, monotonic)."""
    cluster.wait_finished(run_id, f"the run to finish after {fault}")
    print(f"\n[recovery] {fault}: run finished {time.monotonic() - fault_at:.0f} s after it")


def test_sigkilled_worker_batch_is_requeued_when_its_lease_runs_out(
    cluster_factory: ClusterFactory,
    shared_broker: str,
    postgres_url: str,
    cluster_data: Data,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = cluster_factory(shared_broker, postgres_url, **SHORT_LEASE)
    cluster.start_workers("doomed", "rescuer")
    run_id = cluster.submit()
    held = _freeze_holding_a_batch(cluster, run_id, "doomed")
    fault_at = time.monotonic()
    cluster.kill("doomed")  # main process and pool child, as when the machine is lost

    def shown_lost() -> bool:  # after 3 missed heartbeats, while its lease still holds its batch
        return "1 lost" in _status(cluster, monkeypatch)

    until(shown_lost, int(SHORT_LEASE["PATCHQ_LEASE_S"]), "doomed to show as lost", cluster)
    status = _status(cluster, monkeypatch)
    print(f"\n[status {time.monotonic() - fault_at:.0f} s after the kill]\n{status}")
    if cluster.progress(run_id)[2]:  # the rescuer may already be done with everything else
        # What it holds now, not what it held when frozen: a claim it had sent just before the
        # SIGSTOP can commit after the freeze's own query.
        still_held = _held_by(cluster, run_id, "doomed")
        assert set(held) <= set(still_held)
        assert f"{len(still_held)} images wait on lost worker doomed@" in status
        assert "requeued automatically within" in status
        assert "<?" in status.splitlines()[1], "no ETA while images wait on a lost worker"
    assert "1 lost" in status
    _recovered(cluster, run_id, "a SIGKILLed worker", fault_at)
    workers = assert_scored_exactly_once(cluster, run_id, cluster_data)
    assert any(w.startswith("rescuer@") for w in workers)


def test_redis_restarted_empty_is_refilled_from_the_database(
    cluster_factory: ClusterFactory,
    postgres_url: str,
    cluster_data: Data,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    cluster = cluster_factory(f"redis://127.0.0.1:{port}/0", postgres_url, **REFILL_LEASE)
    cluster.start_redis(port)
    cluster.start_workers("survivor")
    run_id = cluster.submit()
    cluster.wait_scored(run_id, 2)
    cluster.pause("survivor", True)  # the run cannot finish while Redis is down and back
    assert cluster.progress(run_id)[2] > 0, "the run finished before Redis could be restarted"
    fault_at = time.monotonic()
    cluster.kill("redis")  # no persistence: the queue is gone
    cluster.start_redis(port)
    cluster.pause("survivor", False)
    # The survivor finishes what it held; then nothing moves until the sweep refills the queue.
    until(lambda: _quiet_s(cluster, run_id) > QUIET_AFTER_S, 60, "the run to go quiet", cluster)
    status = _status(cluster, monkeypatch)
    print(f"\n[status {time.monotonic() - fault_at:.0f} s after the Redis restart]\n{status}")
    assert "the queue was lost and the workers refill it" in status
    _recovered(cluster, run_id, "a Redis restart that lost the queue", fault_at)  # no resubmit
    assert_scored_exactly_once(cluster, run_id, cluster_data)


def test_postgres_restart_fails_no_image(
    cluster_factory: ClusterFactory,
    shared_broker: str,
    private_postgres: PrivatePostgres,
    cluster_data: Data,
) -> None:
    cluster = cluster_factory(shared_broker, private_postgres.url)
    cluster.start_workers("alpha", "beta")
    run_id = cluster.submit()
    cluster.wait_scored(run_id, 2)
    fault_at = time.monotonic()
    private_postgres.stop()
    time.sleep(OUTAGE_S)
    private_postgres.start()
    _recovered(cluster, run_id, f"a {OUTAGE_S} s PostgreSQL outage", fault_at)
    assert_scored_exactly_once(cluster, run_id, cluster_data)  # failed: none


def test_poison_image_fails_with_its_reason_and_the_rest_completes(
    cluster_factory: ClusterFactory, shared_broker: str, postgres_url: str, cluster_data: Data
) -> None:
    poison = sorted(cluster_data.expected)[5]
    cluster = cluster_factory(shared_broker, postgres_url, POISON_IMAGE=poison)
    site_dir = cluster.tmp / "poison-site"
    site_dir.mkdir()
    (site_dir / "sitecustomize.py").write_text(POISON_SITE)
    cluster.env["PYTHONPATH"] = f"{site_dir}:{cluster.env['PYTHONPATH']}"
    cluster.start_worker("taster")
    run_id = cluster.submit()
    waited = cluster.wait_finished(run_id)
    print(f"\n[recovery] a poison image (4 deaths): run finished {waited:.0f} s after submit")
    assert_scored_exactly_once(cluster, run_id, cluster_data, failed=frozenset({poison}))
    with cluster.sessions() as session:
        error = session.scalar(select(Image.error).where(Image.path == poison))
    assert error == "worker lost 4 times while scoring it; see the worker logs"
    # Each dead process was marked by its supervisor: status counts none of them lost.
    with cluster.sessions() as session:
        states = session.scalars(select(Worker.state).where(Worker.node.like("taster@%"))).all()
    assert sorted(set(states)) == ["alive", "died"] and states.count("alive") == 1


def test_rolling_sigterm_restart_drains_and_loses_nothing(
    cluster_factory: ClusterFactory, shared_broker: str, postgres_url: str, cluster_data: Data
) -> None:
    cluster = cluster_factory(shared_broker, postgres_url)
    cluster.start_workers("alpha", "beta")
    run_id = cluster.submit()
    cluster.wait_scored(run_id, 2)
    fault_at = time.monotonic()
    # Beta is held still (for less than a lease) while alpha drains: alone, it would score the
    # 30 small images before beta's turn in the restart came.
    cluster.pause("beta", True)
    cluster.terminate("alpha")  # finishes its batch, then exits
    cluster.pause("beta", False)
    cluster.start_worker("alpha2")
    assert cluster.progress(run_id)[2] > 0, "the run finished before the restart got to beta"
    cluster.terminate("beta")
    cluster.start_worker("beta2")
    _recovered(cluster, run_id, "a rolling SIGTERM restart", fault_at)
    assert_scored_exactly_once(cluster, run_id, cluster_data)
    with cluster.sessions() as session:
        attempts = set(session.scalars(select(Image.attempts)))
        states = session.execute(select(Worker.node, Worker.state)).all()
    assert attempts == {1}, "a drained batch was claimed twice: something was lost and requeued"
    drained = {state for node, state in states if node.partition("@")[0] in ("alpha", "beta")}
    assert drained == {"stopped"}  # they said goodbye: status shows them stopped, not lost
