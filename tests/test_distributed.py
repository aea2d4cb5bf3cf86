"""Real `patchq worker` processes on Redis: every image scored exactly once, whatever dies.

Each test gets its own queue name, Redis database index and results database (SQLite file or
throwaway PostgreSQL database), so tests never see each other's batches. Workers run with a
short visibility timeout, so a batch held by a SIGKILLed worker comes back within seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from common.data.batches import decode_batch
from common.data.layouts import discover
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.ensemble import fit_ensemble, save_ensemble
from common.engine.fit import fit_category
from common.engine.patchcore import PatchCoreConfig
from common.settings import Settings
from common.store.database import (
    init_db,
    make_engine,
    make_session_factory,
    run_progress,
    store_model,
)
from common.store.schema import Image, Score
from producer.submission import broker_app, enqueue_pending, find_images, register_run
from tests.synthetic import make_seed_layout

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]
SHARED_REDIS = "redis://127.0.0.1:6379"
CONFIG = PatchCoreConfig(image_size=64, coreset_ratio=0.25)
N_TEST = 30
BATCH = 2
TIME_LIMIT_S = 20
VISIBILITY_S = 25  # a killed worker's batch is back on the queue after this
START_TIMEOUT_S = 120  # importing torch on a busy 2-core machine is slow
RUN_TIMEOUT_S = 180
COUNTS = ("done", "failed", "pending")


@dataclass(frozen=True)
class Data:
    root: Path
    artifact: bytes
    expected: dict[str, float]  # path -> image score computed in this process


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    root = tmp_path_factory.mktemp("data")
    make_seed_layout(root, "tex", n_good=10, n_bad=2, n_test=N_TEST, size=64)
    records = discover(root)
    model = fit_category(records, CONFIG, holdout=0.2, device="cpu", progress=False).model
    paths = [r.path for r in records if r.split == "test"]
    scores = model.score_tensors(decode_batch(paths, model.preprocessing).tensor).image_scores
    expected = {str(p.absolute()): float(s) for p, s in zip(paths, scores, strict=True)}
    return Data(root, save_artifact(model, "tex"), expected)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Cluster:
    """The processes of one test and the settings they share."""

    tmp: Path
    root: Path  # the data root whose test images are submitted
    settings: Settings
    env: dict[str, str]
    engine: Engine
    sessions: sessionmaker[Session]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start_worker(self, name: str) -> None:
        argv = [sys.executable, "-m", "producer.cli", "worker", f"--hostname={name}@%h"]
        self._spawn(name, argv)

    def start_redis(self, port: int) -> None:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        self._spawn("redis", [*argv, "--save", "", "--appendonly", "no", "--daemonize", "no"])
        _until(lambda: _redis_up(port), 20, "private redis-server to start", self)

    def pause(self, name: str, paused: bool) -> None:
        """SIGSTOP / SIGCONT a process group: freezes a worker so the run cannot end meanwhile."""
        os.killpg(self.processes[name].pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (the worker's pool), as a crash would."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):  # it may have died on its own
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)

    def wait_ready(self, *names: str) -> None:
        for name in names:
            _until(lambda n=name: " ready." in self.log(n), START_TIMEOUT_S, f"{name} ready", self)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def submit(self) -> int:
        """Register the test images in run "r" and enqueue what is pending."""
        records = find_images(self.root, ["tex"], "test")
        submission = register_run(self.sessions, records, "r", "test", BATCH)
        enqueue_pending(
            broker_app(self.settings), self.sessions, submission.run_id, BATCH, self.settings.queue
        )
        return submission.run_id

    def progress(self, run_id: int) -> tuple[int, int, int]:
        with self.sessions() as session:
            rows = run_progress(session, run_id)
        done, failed, pending = (sum(getattr(r, k) for r in rows) for k in COUNTS)
        return done, failed, pending

    def _spawn(self, name: str, argv: list[str]) -> None:
        with (self.tmp / f"{name}.log").open("ab") as output:
            self.processes[name] = subprocess.Popen(
                argv,
                cwd=self.tmp,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches the pool too
            )


def _redis_up(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    cluster: Cluster,
    poll_s: float = 0.5,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(
                f"--- {name}.log\n{cluster.log(name)[-3000:]}" for name in cluster.processes
            )
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs}")
        time.sleep(poll_s)


def _cluster(tmp_path: Path, db_url: str, broker_url: str, data: Data) -> Cluster:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "PATCHQ_BROKER_URL": broker_url,
        "PATCHQ_DATABASE_URL": db_url,
        "PATCHQ_QUEUE": f"dist-test-{uuid.uuid4().hex[:8]}",
        "PATCHQ_DEVICE": "cpu",
        "PATCHQ_BATCH_SIZE": str(BATCH),
        "PATCHQ_MODEL_CACHE_DIR": str(tmp_path / "models"),
        "PATCHQ_TASK_TIME_LIMIT_S": str(TIME_LIMIT_S),
        "PATCHQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    }
    overrides = {k.removeprefix("PATCHQ_").lower(): v for k, v in env.items() if "PATCHQ_" in k}
    settings = Settings.load(overrides)
    engine = make_engine(db_url)
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        digest = artifact_hash(data.artifact)
        store_model(session, "tex", data.artifact, digest, CONFIG.backbone, {}, None, 1)
    return Cluster(tmp_path, data.root, settings, env, engine, sessions)


@pytest.fixture
def cluster_factory(tmp_path: Path, db_url: str, data: Data) -> Iterator[Callable[[str], Cluster]]:
    made: list[Cluster] = []

    def make(broker_url: str) -> Cluster:
        made.append(_cluster(tmp_path, db_url, broker_url, data))
        return made[-1]

    try:
        yield make
    finally:
        for cluster in made:
            for name in list(cluster.processes):
                cluster.kill(name)
            cluster.engine.dispose()


@pytest.fixture
def shared_broker() -> str:
    """A Redis database index of the shared server, random per test, and emptied."""
    url = f"{SHARED_REDIS}/{random.randint(1, 12)}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis at {url} is not reachable: {error}")
    return url


def _assert_scored_exactly_once(cluster: Cluster, run_id: int, data: Data) -> set[str]:
    """Every image done with one score row equal to the in-process score; returns workers."""
    with cluster.sessions() as session:
        images = session.execute(select(Image.id, Image.path, Image.status)).all()
        rows = session.execute(select(Score.image_id, Score.score, Score.worker)).all()
        per_image = session.execute(
            select(func.count()).select_from(Score).group_by(Score.image_id)
        ).scalars()
        assert set(per_image) == {1}
    assert len(images) == N_TEST and {status for _, _, status in images} == {"done"}
    assert len(rows) == N_TEST
    path_of = {image_id: path for image_id, path, _ in images}
    scores = {path_of[image_id]: score for image_id, score, _ in rows}
    keys = sorted(data.expected)
    np.testing.assert_allclose(
        [scores[k] for k in keys], [data.expected[k] for k in keys], rtol=1e-4, atol=1e-4
    )
    return {worker for _, _, worker in rows}


def test_two_workers_share_the_work_and_match_in_process_scores(
    cluster_factory: Callable[[str], Cluster], shared_broker: str, data: Data
) -> None:
    cluster = cluster_factory(shared_broker)
    cluster.start_worker("alpha")
    cluster.start_worker("beta")
    cluster.wait_ready("alpha", "beta")
    run_id = cluster.submit()
    _until(lambda: cluster.progress(run_id)[2] == 0, RUN_TIMEOUT_S, "the run", cluster)
    workers = _assert_scored_exactly_once(cluster, run_id, data)
    assert {w.partition("@")[0] for w in workers} == {"alpha", "beta"}


def test_sigkilled_worker_loses_nothing_and_duplicates_nothing(
    cluster_factory: Callable[[str], Cluster], shared_broker: str, data: Data
) -> None:
    cluster = cluster_factory(shared_broker)
    cluster.start_worker("doomed")
    run_id = cluster.submit()
    # Poll fast: on an idle machine the whole run takes about a second.
    _until(lambda: cluster.progress(run_id)[0] >= 2, RUN_TIMEOUT_S, "first batch", cluster, 0.02)
    cluster.kill("doomed")
    assert cluster.progress(run_id)[2] > 0, "the worker finished before it could be killed"
    cluster.start_worker("rescuer")
    _until(lambda: cluster.progress(run_id)[2] == 0, RUN_TIMEOUT_S, "the run", cluster)
    workers = _assert_scored_exactly_once(cluster, run_id, data)
    assert any(w.startswith("rescuer@") for w in workers)


def test_redis_restart_mid_run_then_resubmit_completes_the_run(
    cluster_factory: Callable[[str], Cluster], data: Data
) -> None:
    port = _free_port()
    cluster = cluster_factory(f"redis://127.0.0.1:{port}/0")
    cluster.start_redis(port)
    cluster.start_worker("survivor")
    cluster.wait_ready("survivor")
    run_id = cluster.submit()
    _until(lambda: cluster.progress(run_id)[0] >= 2, RUN_TIMEOUT_S, "first batch", cluster, 0.02)
    cluster.pause("survivor", True)  # the run cannot finish while Redis is down and back
    assert cluster.progress(run_id)[2] > 0, "the run finished before Redis could be restarted"
    cluster.kill("redis")  # no persistence: the queue is gone
    cluster.start_redis(port)
    cluster.pause("survivor", False)
    cluster.submit()  # the database knows what is pending; the same command refills the queue
    _until(lambda: cluster.progress(run_id)[2] == 0, RUN_TIMEOUT_S, "the run", cluster)
    _assert_scored_exactly_once(cluster, run_id, data)


@pytest.fixture(scope="module")
def ensemble_data(data: Data) -> Data:
    """The same images judged by a two-member ensemble (the critical-parts preset's kind)."""
    records = discover(data.root)
    members = [CONFIG, dataclasses.replace(CONFIG, layers=("stage2", "stage3"))]
    ensemble = fit_ensemble(records, members, holdout=0.2, device="cpu", progress=False).ensemble
    paths = [r.path for r in records if r.split == "test"]
    scores = ensemble.score_tensors(decode_batch(paths, ensemble.preprocessing).tensor)
    expected = {
        str(p.absolute()): float(s) for p, s in zip(paths, scores.image_scores, strict=True)
    }
    return Data(data.root, save_ensemble(ensemble, "tex"), expected)


def test_an_ensemble_is_scored_through_the_queue_like_any_model(
    tmp_path: Path, db_url: str, shared_broker: str, ensemble_data: Data
) -> None:
    cluster = _cluster(tmp_path, db_url, shared_broker, ensemble_data)
    try:
        cluster.start_worker("alpha")
        cluster.wait_ready("alpha")
        run_id = cluster.submit()
        _until(lambda: cluster.progress(run_id)[2] == 0, RUN_TIMEOUT_S, "the run", cluster)
        _assert_scored_exactly_once(cluster, run_id, ensemble_data)
    finally:
        for name in list(cluster.processes):
            cluster.kill(name)
        cluster.engine.dispose()
