"""`patchq flower` against the real Redis and a real `patchq worker` process.

Batches are enqueued before anything runs, so the queue length must show with no worker up;
then a worker starts, Flower lists it, and the queue drains. The batches name images that do
not exist, so the worker consumes them without needing a model.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select

from common.settings import Settings
from common.store.connection import init_db, make_engine
from common.store.fleet_schema import Worker
from tests.parallel import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[1]
# A Redis database of its own: Flower lists every worker on its broker, and other tests run
# workers on the default database.
BROKER_URL = os.environ.get("PATCHQ_TEST_FLOWER_BROKER_URL", "redis://127.0.0.1:6379/13")
LOGIN = ("inspector", "flower-test-secret")
BATCHES = 3
START_TIMEOUT_S = 90  # importing torch on a busy 2-core machine is slow
DRAIN_TIMEOUT_S = 90


@pytest.fixture
def environment(tmp_path: Path) -> dict[str, str]:
    """The environment of every process of the test: a fresh queue and an empty database."""
    try:
        redis.Redis.from_url(BROKER_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis at {BROKER_URL} is not reachable: {error}")
    database_url = f"sqlite:///{tmp_path / 'patchq.db'}"
    engine = make_engine(database_url)
    init_db(engine)
    engine.dispose()
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "PATCHQ_BROKER_URL": BROKER_URL,
        "PATCHQ_DATABASE_URL": database_url,
        "PATCHQ_QUEUE": f"flower-test-{uuid.uuid4().hex[:8]}",
        "PATCHQ_FLOWER_BASIC_AUTH": ":".join(LOGIN),
        "PATCHQ_DEVICE": "cpu",
        "PATCHQ_MODEL_CACHE_DIR": str(tmp_path / "models"),
    }


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str], str], None]]:
    """Starts processes (output to a log file in tmp_path) and stops them all afterwards."""
    processes: list[tuple[subprocess.Popen[bytes], Path]] = []

    def launch(argv: list[str], env: dict[str, str], name: str) -> None:
        log = tmp_path / f"{name}.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                argv, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT
            )
        processes.append((process, log))

    yield launch
    for process, log in processes:
        _stop(process)
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 15 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


def _get(url: str, login: tuple[str, str] | None = LOGIN) -> tuple[int, bytes]:
    """Status and body of GET `url`, with Basic auth unless `login` is None."""
    request = urllib.request.Request(url)
    if login is not None:
        token = base64.b64encode(":".join(login).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _wait_for(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def _worker_nodes(database_url: str) -> set[str]:
    """The node names in the workers table, which `patchq status` lists."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return set(connection.scalars(select(Worker.node)))
    finally:
        engine.dispose()


def _queue_length(base: str, queue: str) -> int | None:
    status, body = _get(f"{base}/api/queues/length")
    if status != 200:
        return None
    lengths = {q["name"]: q["messages"] for q in json.loads(body)["active_queues"]}
    return lengths.get(queue)


def test_flower_shows_the_queue_and_the_worker_behind_a_login(
    environment: dict[str, str],
    start: Callable[[list[str], dict[str, str], str], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue = environment["PATCHQ_QUEUE"]
    monkeypatch.setenv("PATCHQ_BROKER_URL", BROKER_URL)  # worker.app builds an app on import
    worker_app = importlib.import_module("worker.app")
    producer = worker_app.make_app(Settings.load({"broker_url": BROKER_URL, "queue": queue}))
    for batch in range(BATCHES):
        producer.send_task(worker_app.TASK_NAME, args=[1, [10_000 + batch]], queue=queue)

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start(
        [sys.executable, "-m", "producer.cli", "flower", "--port", str(port)], environment, "flower"
    )
    _wait_for("Flower to answer", lambda: _get(f"{base}/healthcheck")[0] == 200, START_TIMEOUT_S)

    # Before any worker exists, the queue and its backlog show.
    assert _wait_for("the queue length", lambda: _queue_length(base, queue), 30) == BATCHES

    # Without (or with a wrong) login, the API refuses.
    for path in ("/api/workers", "/api/queues/length", "/api/tasks"):
        assert _get(base + path, login=None)[0] == 401, path
        assert _get(base + path, login=(LOGIN[0], "wrong"))[0] == 401, path

    worker_name = f"flower-test-{uuid.uuid4().hex[:8]}@localhost"
    worker = ["worker", "--queues", queue, "--concurrency", "1", "--hostname", worker_name]
    start([sys.executable, "-m", "producer.cli", *worker], environment, "worker")

    def worker_listed() -> bool:
        status, body = _get(f"{base}/api/workers?refresh=1")
        return status == 200 and worker_name in json.loads(body)

    _wait_for("Flower to list the worker", worker_listed, START_TIMEOUT_S)
    _wait_for("the queue to drain", lambda: _queue_length(base, queue) == 0, DRAIN_TIMEOUT_S)
    assert _worker_nodes(environment["PATCHQ_DATABASE_URL"]) == {worker_name}  # = patchq status

    status, body = _get(f"{base}/metrics")
    assert status == 200
    assert b"flower_" in body
