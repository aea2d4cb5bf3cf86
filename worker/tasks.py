"""The scoring task: common.scoring's stages, pipelined, plus what only a queue needs.

Per worker process, the database engine, the model provider and the scorer are created on
the first task, i.e. after a prefork pool has forked, so no connection, CUDA context or FAISS
index is ever shared with a parent process. Each scoring process also runs a heartbeat
(worker.heartbeat), started when the process starts and stopped when it drains, which renews
the leases of the batches in hand and sweeps for work nobody holds any more.

With the `threads` pool (the default, run under worker.supervisor), one task per thread
overlaps its decode and write with the other tasks' backbone (common.pipelined). Celery
enforces no time limit on threads, so a watchdog here does what the prefork pool's time limit
does: fail the overdue batch's images with the reason, then end the process, whose supervisor
requeues its other batches and starts a new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from typing import Any

from celery import Task
from celery.concurrency.solo import TaskPool as SoloPool
from celery.concurrency.thread import TaskPool as ThreadsPool
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import (
    celeryd_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.data.object_store import ObjectStoreUnavailable
from common.data.object_store import counters as fetch_counters
from common.errors import PatchqError
from common.pipelined import PipelinedScorer
from common.scoring.context import ScoringContext
from common.scoring.model_cache import ModelProvider
from common.store.connection import DatabaseError, make_engine, make_session_factory
from common.store.image_rows import mark_failed
from common.store.leases import Lease
from common.store.workers import process_name
from worker.app import app, settings
from worker.config import TASK_NAME
from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)
# Lost connections and a server restarting: retried, never recorded on the images.
TRANSIENT_DB_ERRORS = (OperationalError, InterfaceError)
# The database's or the object store's: the batch is tried again, its images untouched.
TRANSIENT_ERRORS = (*TRANSIENT_DB_ERRORS, ObjectStoreUnavailable)
WATCHDOG_EVERY_S = 5
_node = {"name": ""}  # this worker's Celery node name, set in the main process before the fork
_heartbeat: dict[int, Heartbeat] = {}  # pid -> this process's heartbeat, once started
_scorer_lock = threading.Lock()
_scorers: dict[int, PipelinedScorer] = {}  # pid -> this process's scorer, once built


@cache
def _sessions(pid: int) -> sessionmaker[Session]:
    """This process's session factory (keyed by pid: never inherited)."""
    return make_session_factory(make_engine(settings.database_url))


def _scorer(pid: int, node: str) -> PipelinedScorer:
    """This process's scorer, built once whichever of the pool's threads asks first."""
    with _scorer_lock:
        if pid not in _scorers:
            sessions = _sessions(pid)
            context = ScoringContext(
                sessions,
                ModelProvider(sessions, settings.model_cache_dir, settings.device),
                process_name(node, pid),
                max_deliveries=settings.max_redeliveries + 1,
                lease=Lease(node, settings.lease_s),
                pin_memory=settings.device.startswith("cuda"),
            )
            _scorers[pid] = PipelinedScorer(context)
        return _scorers[pid]


def _watchdog() -> None:
    """Fail batches that overran PATCHQ_TASK_TIME_LIMIT_S and end the process (a hung thread
    cannot be stopped otherwise). The heartbeat renews a hung batch's lease, so only this
    ends it; the supervisor requeues the process's other batches and starts a new one."""
    while True:
        time.sleep(WATCHDOG_EVERY_S)
        scorer = _scorers.get(os.getpid())
        overdue = [] if scorer is None else scorer.overdue(settings.task_time_limit_s)
        if overdue:
            sessions = _sessions(os.getpid())
            for batch in overdue:
                _fail(sessions, batch.run_id, list(batch.image_ids), _timeout_reason())
            log.error("%d batch(es) overran the time limit; ending this worker", len(overdue))
            os._exit(70)


@app.task(
    bind=True,
    name=TASK_NAME,
    autoretry_for=TRANSIENT_ERRORS,
    retry_backoff=2,
    retry_backoff_max=30,
    retry_jitter=True,
    # An outage of the database or the object store lasts as long as it lasts: keep retrying
    # (never failing the images), so the batch goes on within 30 s of the service's return,
    # without waiting for a sweep.
    max_retries=None,
)
def score_batch_task(self: Task, run_id: int, image_ids: list[int]) -> None:
    """Score a batch; a transient database error is retried with backoff, a user-level error
    (missing model, CUDA asked for but absent) or a timeout fails the batch's images with
    the reason, so nothing waits forever as pending."""
    try:
        sessions = _sessions(os.getpid())
        scorer = _scorer(os.getpid(), self.request.hostname)
    except DatabaseError as error:  # unreachable at this moment: try again later
        raise self.retry(exc=error, countdown=5) from error
    try:
        with _working_on(run_id, image_ids):
            outcome = scorer.score(run_id, image_ids)
    except SoftTimeLimitExceeded:
        _fail(sessions, run_id, image_ids, _timeout_reason())
        raise
    except TRANSIENT_ERRORS:
        raise  # transient trouble: autoretry_for delivers the batch again
    except PatchqError as error:
        _fail(sessions, run_id, image_ids, str(error))
        raise
    except Exception as error:
        # Anything else (CUDA out of memory, a FAISS error, a full disk) would be acked and
        # forgotten, leaving the images pending forever: record it on them first.
        _fail(sessions, run_id, image_ids, f"unexpected {type(error).__name__}: {error}")
        raise
    log.info(
        "run %s: %d done, %d failed, %d skipped; %s%s",
        run_id,
        len(outcome.done),
        len(outcome.failed),
        len(outcome.skipped),
        ", ".join(f"{key} {value:.2f}" for key, value in outcome.timings.items()),
        _fetch_note(),
    )


def _fetch_note() -> str:
    """This process's object requests so far, when it made any: retries show a flaky store."""
    if not fetch_counters.requests:
        return ""
    return (
        f"; object requests {fetch_counters.requests}, retried {fetch_counters.retries}, "
        f"unavailable {fetch_counters.unavailable}"
    )


def _timeout_reason() -> str:
    return (
        f"batch not scored within PATCHQ_TASK_TIME_LIMIT_S={settings.task_time_limit_s}; "
        "lower PATCHQ_BATCH_SIZE or raise the limit"
    )


def _fail(sessions: sessionmaker[Session], run_id: int, image_ids: list[int], reason: str) -> None:
    with sessions.begin() as session:
        mark_failed(session, run_id, dict.fromkeys(image_ids, reason))


def _working_on(run_id: int, image_ids: list[int]) -> AbstractContextManager[None]:
    heartbeat = _heartbeat.get(os.getpid())
    return nullcontext() if heartbeat is None else heartbeat.working_on(run_id, image_ids)


def _start_heartbeat() -> None:
    _heartbeat[os.getpid()] = Heartbeat(
        lambda: _sessions(os.getpid()), app, settings, _node["name"]
    )


def _stop_heartbeat() -> None:
    heartbeat = _heartbeat.pop(os.getpid(), None)
    if heartbeat is not None:
        heartbeat.stop()


@celeryd_init.connect
def _remember_node(sender: str, **_: Any) -> None:
    _node["name"] = sender


@worker_process_init.connect
def _on_pool_process_start(**_: Any) -> None:
    _start_heartbeat()


@worker_process_shutdown.connect
def _on_pool_process_exit(**_: Any) -> None:
    _stop_heartbeat()


@worker_ready.connect
def _on_worker_ready(sender: Any, **_: Any) -> None:
    if isinstance(sender.pool, (SoloPool, ThreadsPool)):  # no pool process: this one scores
        _start_heartbeat()
    if isinstance(sender.pool, ThreadsPool):  # Celery's time limits need pool processes
        threading.Thread(target=_watchdog, name="patchq-watchdog", daemon=True).start()


@worker_shutdown.connect
def _on_worker_exit(**_: Any) -> None:
    _stop_heartbeat()
