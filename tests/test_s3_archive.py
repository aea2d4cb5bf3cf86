"""A fleet scoring an archive in an S3-compatible bucket: real `patchq submit` and `patchq worker`
processes, real Redis and PostgreSQL, and moto's S3 server (tests.object_server) as the store.

The archive stays in the bucket: submit lists the prefix, workers GET the objects, and neither
writes anything of them to disk.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, MetaData, func, select

from common.store.schema import Image, Run, Score
from tests.cluster import N_TEST, RUN_TIMEOUT_S, Cluster, ClusterFactory, Data, until
from tests.object_server import ObjectServer

pytestmark = pytest.mark.integration


def _upload_test_images(server: ObjectServer, data: Data) -> str:
    bucket = server.new_bucket()
    server.upload_tree(data.root / "tex" / "test", bucket, "tex")
    return bucket


def _patchq(cluster: Cluster, *args: str) -> str:
    """Run a patchq command as a user would, with the cluster's environment; its output."""
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        cwd=cluster.tmp,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _run_id(cluster: Cluster) -> int:
    with cluster.sessions() as session:
        return session.scalars(select(Run.id).where(Run.name == "r")).one()


def _outcomes(cluster: Cluster) -> tuple[dict[str, float], dict[str, str]]:
    """Scores by object name ({name: score}) and failures ({name: reason}); one row each."""
    with cluster.sessions() as session:
        per_image = session.scalars(
            select(func.count()).select_from(Score).group_by(Score.image_id)
        ).all()
        assert set(per_image) <= {1}, "an image was written twice"
        rows = session.execute(
            select(Image.path, Image.status, Image.error, Score.score).outerjoin(
                Score, Score.image_id == Image.id
            )
        ).all()
    scores = {Path(r.path).name: r.score for r in rows if r.status == "done"}
    failures = {Path(r.path).name: r.error for r in rows if r.status == "failed"}
    assert all(r.status in ("done", "failed") for r in rows)
    return scores, failures


def _assert_scores_match(scores: dict[str, float], data: Data) -> None:
    expected = {Path(path).name: score for path, score in data.expected.items()}
    names = sorted(scores)
    np.testing.assert_allclose(
        [scores[n] for n in names], [expected[n] for n in names], rtol=1e-4, atol=1e-4
    )


def _everything_in(engine: Engine) -> str:
    """Every row of every table, as text: where a leaked secret would show."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        return "\n".join(
            repr(row)
            for table in metadata.sorted_tables
            for row in connection.execute(select(table))
        )


def test_a_fleet_scores_a_bucket_once_and_bad_objects_fail_alone_without_leaking_secrets(
    cluster_factory: ClusterFactory,
    shared_broker: str,
    postgres_url: str,
    cluster_data: Data,
    private_object_server: ObjectServer,
) -> None:
    server = private_object_server
    bucket = _upload_test_images(server, cluster_data)
    server.put(
        bucket, "tex/forbidden/secret.png", (cluster_data.root / "tex/test/000.png").read_bytes()
    )
    server.put(bucket, "tex/zz-corrupt.png", b"\x89PNG\r\n\x1a\n truncated")
    reader = server.enforce_auth(denied_prefix=f"{bucket}/tex/forbidden/")
    cluster = cluster_factory(shared_broker, postgres_url, **server.env(reader))

    submitted = _patchq(cluster, "submit", f"s3://{bucket}/tex/", "--category", "tex", "--run", "r")
    assert f"{N_TEST + 2} new images" in submitted
    server.delete(bucket, "tex/029.png")  # gone between listing and scoring
    cluster.start_workers("alpha", "beta")
    cluster.wait_finished(_run_id(cluster))

    scores, failures = _outcomes(cluster)
    assert sorted(failures) == ["029.png", "secret.png", "zz-corrupt.png"]
    assert failures["029.png"].endswith("404 Not Found (NoSuchKey)")
    assert failures["secret.png"].endswith("403 Forbidden (AccessDenied)")
    assert failures["zz-corrupt.png"].endswith("corrupt or truncated image (Truncated File Read)")
    assert len(scores) == N_TEST - 1
    _assert_scores_match(scores, cluster_data)

    shown = "\n".join(
        [
            submitted,
            _patchq(cluster, "status", "r"),
            _patchq(cluster, "config"),
            cluster.log("alpha"),
            cluster.log("beta"),
            _everything_in(cluster.engine),
        ]
    )
    assert "object requests" in cluster.log("alpha") + cluster.log("beta")
    for secret in (reader.secret, reader.key_id):
        assert secret not in shown


def test_the_object_server_restarting_mid_run_loses_and_repeats_nothing(
    cluster_factory: ClusterFactory,
    shared_broker: str,
    postgres_url: str,
    cluster_data: Data,
    private_object_server: ObjectServer,
) -> None:
    server = private_object_server
    bucket = _upload_test_images(server, cluster_data)
    cluster = cluster_factory(shared_broker, postgres_url, **server.env())
    cluster.start_workers("alpha")
    _patchq(cluster, "submit", f"s3://{bucket}/tex/", "--category", "tex", "--run", "r")
    run_id = _run_id(cluster)
    cluster.wait_scored(run_id, 4)
    server.stop()
    until(
        lambda: "ObjectStoreUnavailable" in cluster.log("alpha"),
        RUN_TIMEOUT_S,
        "the worker to find the store gone",
        cluster,
    )
    server.restart()
    cluster.wait_finished(run_id, "the run after the store came back")

    scores, failures = _outcomes(cluster)
    assert failures == {}
    assert len(scores) == N_TEST
    _assert_scores_match(scores, cluster_data)
