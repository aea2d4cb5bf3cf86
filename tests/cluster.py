"""Real patchq processes for integration tests: workers, a private redis-server or PostgreSQL.

Each test gets its own queue name and results database, and the Redis database index of its
xdist worker (tests.parallel) or a private broker, so tests never see each other's batches.
Settings are patchq's defaults except the test's queue, device and the small batches of a
tiny synthetic category, and SHORT_LEASE where a test waits for a lease to run out.
tests/conftest.py loads this module as a plugin, so its fixtures (`cluster_data`,
`cluster_factory`, `shared_broker`, `private_postgres`) are there for every test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.settings import Settings
from common.store.connection import init_db, make_engine, make_session_factory
from common.store.model_rows import store_model
from common.store.run_rows import run_progress
from common.store.schema import Image, Score
from producer.submission import enqueue_pending, find_images, register_run
from synthetic.layouts import make_seed_layout
from tests.parallel import free_port, redis_index
from worker.broker_check import broker_app

ROOT = Path(__file__).parents[1]
SHARED_REDIS = "redis://127.0.0.1:6379"
CONFIG = PatchCoreConfig(image_size=64, coreset_ratio=0.25)
N_TEST = 30
BATCH = 2
START_TIMEOUT_S = 180  # importing torch on a busy 2-core machine is slow
RUN_TIMEOUT_S = 240
COUNTS = ("done", "failed", "pending")
POSTGRES_USER = "postgres"  # initdb refuses to run as root
# For tests that wait for a lease to run out: 20 s renewed every 2 s instead of the defaults'
# 60 s and 5 s. The same sweep requeues the same batches, a third of the wait sooner; a live
# worker still renews ten times per lease, and a lost one shows as lost (3 missed heartbeats)
# 14 s before its lease ends.
SHORT_LEASE = {"PATCHQ_LEASE_S": "20", "PATCHQ_HEARTBEAT_S": "2"}


@dataclass(frozen=True)
class Data:
    root: Path
    artifact: bytes
    expected: dict[str, float]  # path -> image score computed in this process


@pytest.fixture(scope="session")
def cluster_data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    """The tiny "tex" category and its fitted model, once per pytest process for every module
    that runs a cluster; read-only (tests build their own data to change it)."""
    root = tmp_path_factory.mktemp("data")
    make_seed_layout(root, "tex", n_good=10, n_bad=2, n_test=N_TEST, size=64)
    records = discover(root)
    model = fit_category(records, CONFIG, holdout=0.2, device="cpu", progress=False).model
    paths = [r.path for r in records if r.split == "test"]
    scores = model.score_tensors(decode_batch(paths, model.preprocessing).tensor).image_scores
    expected = {str(p.absolute()): float(s) for p, s in zip(paths, scores, strict=True)}
    return Data(root, save_artifact(model, "tex"), expected)


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

    def start_worker(self, name: str, *options: str) -> None:
        """Start `patchq worker` with default settings plus `options` (e.g. --pool prefork)."""
        argv = [sys.executable, "-m", "producer.cli", "worker", f"--hostname={name}@%h"]
        self._spawn(name, [*argv, *options])

    def start_workers(self, *names: str) -> None:
        """Start workers and wait until all of them take batches."""
        for name in names:
            self.start_worker(name)
        self.wait_ready(*names)

    def start_redis(self, port: int) -> None:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        self._spawn("redis", [*argv, "--save", "", "--appendonly", "no", "--daemonize", "no"])
        until(lambda: _redis_up(port), 20, "private redis-server to start", self)

    def pause(self, name: str, paused: bool) -> None:
        """SIGSTOP / SIGCONT a process group: freezes a worker so the run cannot end meanwhile."""
        os.killpg(self.processes[name].pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (the worker's pool), as a crash would."""
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):  # it may have died on its own
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=20)

    def terminate(self, name: str) -> None:
        """SIGTERM the main process alone, as systemd or Kubernetes stop a worker; wait for it."""
        process = self.processes[name]
        process.send_signal(signal.SIGTERM)
        until(lambda: process.poll() is not None, START_TIMEOUT_S, f"{name} to drain", self)
        self.processes.pop(name)

    def wait_ready(self, *names: str) -> None:
        for name in names:
            until(lambda n=name: " ready." in self.log(n), START_TIMEOUT_S, f"{name} ready", self)

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

    def wait_finished(self, run_id: int, what: str = "the run") -> float:
        """Wait until nothing of the run is pending; returns the seconds waited."""
        start = time.monotonic()
        until(lambda: self.progress(run_id)[2] == 0, RUN_TIMEOUT_S, what, self)
        return time.monotonic() - start

    def wait_scored(self, run_id: int, count: int) -> None:
        """Poll fast until `count` images are finished: faults must land mid-run."""
        until(lambda: sum(self.progress(run_id)[:2]) >= count, RUN_TIMEOUT_S, "scoring", self, 0.02)

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


def until(
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
                f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
                for path in sorted(cluster.tmp.glob("*.log"))
            )
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs}")
        time.sleep(poll_s)


def _cluster(
    tmp_path: Path, db_url: str, broker_url: str, data: Data, extra_env: dict[str, str]
) -> Cluster:
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
        **extra_env,
    }
    if "OMP_NUM_THREADS" in os.environ:  # torch's share of the cores, per xdist worker (conftest)
        env.setdefault("OMP_NUM_THREADS", os.environ["OMP_NUM_THREADS"])
    overrides = {k.removeprefix("PATCHQ_").lower(): v for k, v in env.items() if "PATCHQ_" in k}
    settings = Settings.load(overrides)
    engine = make_engine(db_url)
    init_db(engine)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        digest = artifact_hash(data.artifact)
        store_model(session, "tex", data.artifact, digest, CONFIG.backbone, {}, None, 1)
    return Cluster(tmp_path, data.root, settings, env, engine, sessions)


ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def cluster_factory(tmp_path: Path, cluster_data: Data) -> Iterator[ClusterFactory]:
    """make(broker_url, db_url, data=None, **env): a cluster whose one model is `data`'s
    (default `cluster_data`'s); its processes are killed after the test."""
    made: list[Cluster] = []

    def make(broker_url: str, db_url: str, data: Data | None = None, **extra_env: str) -> Cluster:
        made.append(_cluster(tmp_path, db_url, broker_url, data or cluster_data, extra_env))
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
    """A Redis database index of the shared server, one per xdist worker (tests.parallel)."""
    url = f"{SHARED_REDIS}/{redis_index()}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis at {url} is not reachable: {error}")
    return url


def assert_scored_exactly_once(
    cluster: Cluster, run_id: int, data: Data, failed: frozenset[str] = frozenset()
) -> set[str]:
    """Every image but `failed` done with one score row equal to the in-process score;
    returns the workers that wrote them."""
    with cluster.sessions() as session:
        images = session.execute(select(Image.id, Image.path, Image.status)).all()
        rows = session.execute(select(Score.image_id, Score.score, Score.worker)).all()
        per_image = session.execute(
            select(func.count()).select_from(Score).group_by(Score.image_id)
        ).scalars()
        assert set(per_image) == {1}
    assert len(images) == N_TEST
    assert {path for _, path, status in images if status != "done"} == set(failed)
    assert len(rows) == N_TEST - len(failed)
    path_of = {image_id: path for image_id, path, _ in images}
    scores = {path_of[image_id]: score for image_id, score, _ in rows}
    keys = sorted(set(data.expected) - failed)
    np.testing.assert_allclose(
        [scores[k] for k in keys], [data.expected[k] for k in keys], rtol=1e-4, atol=1e-4
    )
    return {worker for _, _, worker in rows}


@dataclass(frozen=True)
class PrivatePostgres:
    """A PostgreSQL server of the test's own, which the test may stop and start."""

    folder: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{POSTGRES_USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._pg_ctl("start", "-w", "-l", str(self.folder / "server.log"), "-o", self._options())

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast", "-w")

    def _options(self) -> str:
        return f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"

    def _pg_ctl(self, *args: str) -> None:
        command = [str(self.bin_dir / "pg_ctl"), "-D", str(self.folder / "data"), *args]
        subprocess.run(_as_postgres(command), check=True, capture_output=True, timeout=120)


def _as_postgres(command: list[str]) -> list[str]:
    return command if os.geteuid() != 0 else ["runuser", "-u", POSTGRES_USER, "--", *command]


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """initdb into a fresh folder owned by the postgres user, started on a free port."""
    bin_dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not bin_dirs or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (/usr/lib/postgresql/*/bin) are not installed")
    folder = Path(tempfile.mkdtemp(prefix="patchq-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, POSTGRES_USER, POSTGRES_USER)
    server = PrivatePostgres(folder, free_port(), bin_dirs[-1].parent)
    initdb = [str(server.bin_dir / "initdb"), "-D", str(folder / "data"), "-A", "trust"]
    subprocess.run(_as_postgres([*initdb, "-U", POSTGRES_USER]), check=True, capture_output=True)
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
