"""Real `patchq worker` processes on Redis share a run and write the in-process scores.

The faults (a killed worker, a lost broker, a database restart, a poison image, a rolling
restart) are in tests/test_recovery.py; the cluster helpers in tests/cluster.py.
"""

from __future__ import annotations

import pytest

from tests.cluster import ClusterFactory, Data, assert_scored_exactly_once

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
