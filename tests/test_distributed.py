"""Real `patchq worker` processes on Redis share a run and write the in-process scores.

The faults (a killed worker, a lost broker, a database restart, a poison image, a rolling
restart) are in tests/test_recovery.py; the cluster helpers in tests/cluster.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import redis
from sqlalchemy import select

from common.data.batches import decode_batch
from common.data.layouts import discover
from common.engine.ensemble import fit_ensemble, save_ensemble
from common.store.fleet_schema import Worker
from tests.cluster import CONFIG, SHORT_LEASE, ClusterFactory, Data, assert_scored_exactly_once

pytestmark = pytest.mark.integration


def test_two_workers_share_the_work_and_match_in_process_scores(
    cluster_factory: ClusterFactory, shared_broker: str, db_url: str, cluster_data: Data
) -> None:
    cluster = cluster_factory(shared_broker, db_url)
    cluster.start_workers("alpha", "beta")
    run_id = cluster.submit()
    cluster.wait_finished(run_id)
    workers = assert_scored_exactly_once(cluster, run_id, cluster_data)
    assert {w.partition("@")[0] for w in workers} == {"alpha", "beta"}


@pytest.fixture(scope="module")
def ensemble_data(cluster_data: Data) -> Data:
    """The same images judged by a two-member ensemble (the critical-parts preset's kind)."""
    records = discover(cluster_data.root)
    members = [CONFIG, dataclasses.replace(CONFIG, layers=("stage2", "stage3"))]
    ensemble = fit_ensemble(records, members, holdout=0.2, device="cpu", progress=False).ensemble
    paths = [r.path for r in records if r.split == "test"]
    scores = ensemble.score_tensors(decode_batch(paths, ensemble.preprocessing).tensor)
    expected = {
        str(p.absolute()): float(s) for p, s in zip(paths, scores.image_scores, strict=True)
    }
    return Data(cluster_data.root, save_ensemble(ensemble, "tex"), expected)


def test_an_ensemble_is_scored_through_the_queue_like_any_model(
    cluster_factory: ClusterFactory, shared_broker: str, db_url: str, ensemble_data: Data
) -> None:
    cluster = cluster_factory(shared_broker, db_url, data=ensemble_data)
    cluster.start_workers("alpha")
    run_id = cluster.submit()
    cluster.wait_finished(run_id)
    assert_scored_exactly_once(cluster, run_id, ensemble_data)


def test_default_worker_holds_its_depth_beats_and_its_batches_survive_a_sigkill(
    cluster_factory: ClusterFactory, shared_broker: str, db_url: str, cluster_data: Data
) -> None:
    """The default (pipelined, supervised) worker holds at most PATCHQ_PIPELINE_DEPTH batches,
    runs a heartbeat in its one scoring process, and what it held when killed with its
    supervisor is requeued by the lease sweep and scored by another worker, once."""
    cluster = cluster_factory(shared_broker, db_url, **SHORT_LEASE)
    cluster.start_worker("piped")
    cluster.wait_ready("piped")
    run_id = cluster.submit()
    cluster.wait_scored(run_id, 2)
    cluster.pause("piped", True)
    held = _unacknowledged(shared_broker, cluster.settings.queue)
    pending = cluster.progress(run_id)[2]
    with cluster.sessions() as session:
        nodes = set(session.scalars(select(Worker.node)))
    cluster.kill("piped")
    assert pending > 0, "the worker finished before it could be paused"
    assert 0 < held <= cluster.settings.pipeline_depth
    assert any(node.startswith("piped@") for node in nodes), "no heartbeat from the worker"
    cluster.start_workers("rescuer")
    cluster.wait_finished(run_id)
    assert_scored_exactly_once(cluster, run_id, cluster_data)


def _unacknowledged(broker_url: str, queue: str) -> int:
    """Messages of `queue` delivered and not yet acknowledged: kombu keeps them in the Redis
    hash "unacked" as JSON [message, exchange, routing key], shared by every queue of the
    database index (other tests may use the same one)."""
    held = redis.Redis.from_url(broker_url).hvals("unacked")
    return sum(json.loads(value)[2] == queue for value in held)
