"""The scoring task: common.scoring's stages, pipelined, plus what only a queue needs.

Per worker process, the database engine, the model provider and the pipelined scorer are
created on the first task, i.e. after a prefork pool has forked, so no connection, CUDA context
or FAISS index is ever shared with a parent process. With the default `threads` pool, one task
per thread overlaps its decode and write with the other tasks' backbone (common.pipelined);
Celery enforces no time limit on threads, so a watchdog here does what the prefork pool's time
limit does: fail the overdue batch's images with the reason, then end the process, whose
unacknowledged batches the broker hands to another worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import PatchqError
from common.pipelined import PipelinedScorer
from common.scoring import ModelProvider
from common.store.database import DatabaseError, make_engine, make_session_factory, mark_failed
from worker.app import app, settings
from worker.config import TASK_NAME

log = logging.getLogger(__name__)
WATCHDOG_EVERY_S = 5
_state_lock = threading.Lock()
_states: dict[int, tuple[sessionmaker[Session], PipelinedScorer]] = {}


def _process_state(pid: int, worker_name: str) -> tuple[sessionmaker[Session], PipelinedScorer]:
    """This process's session factory and scorer (keyed by pid: never inherited), built once
    whichever of the pool's threads asks first."""
    with _state_lock:
        if pid not in _states:
            sessions = make_session_factory(make_engine(settings.database_url))
            provider = ModelProvider(sessions, settings.model_cache_dir, settings.device)
            scorer = PipelinedScorer(
                sessions,
                provider,
                worker_name,
                max_deliveries=settings.max_redeliveries + 1,
                pin_memory=settings.device.startswith("cuda"),
            )
            _states[pid] = sessions, scorer
            threading.Thread(target=_watchdog, args=(sessions, scorer), daemon=True).start()
        return _states[pid]


def _watchdog(sessions: sessionmaker[Session], scorer: PipelinedScorer) -> None:
    """Fail batches that overran PATCHQ_TASK_TIME_LIMIT_S and end the process (a hung thread
    cannot be stopped otherwise); its other batches are redelivered and nothing is lost."""
    while True:
        time.sleep(WATCHDOG_EVERY_S)
        overdue = scorer.overdue(settings.task_time_limit_s)
        if overdue:
            for batch in overdue:
                _fail(sessions, batch.run_id, list(batch.image_ids), _timeout_reason())
            log.error("%d batch(es) overran the time limit; ending this worker", len(overdue))
            os._exit(70)


@app.task(
    bind=True,
    name=TASK_NAME,
    autoretry_for=(OperationalError,),
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    max_retries=5,
)
def score_batch_task(self: Task, run_id: int, image_ids: list[int]) -> None:
    """Score a batch; a transient database error is retried with backoff, a user-level error
    (missing model, CUDA asked for but absent) or a timeout fails the batch's images with
    the reason, so nothing waits forever as pending."""
    try:
        sessions, scorer = _process_state(os.getpid(), f"{self.request.hostname}/{os.getpid()}")
    except DatabaseError as error:  # unreachable at this moment: try again later
        raise self.retry(exc=error, countdown=5) from error
    try:
        outcome = scorer.score(run_id, image_ids)
    except SoftTimeLimitExceeded:
        _fail(sessions, run_id, image_ids, _timeout_reason())
        raise
    except PatchqError as error:
        _fail(sessions, run_id, image_ids, str(error))
        raise
    except OperationalError:
        raise  # transient database trouble: autoretry_for delivers the batch again
    except Exception as error:
        # Anything else (CUDA out of memory, a FAISS error, a full disk) would be acked and
        # forgotten, leaving the images pending forever: record it on them first.
        _fail(sessions, run_id, image_ids, f"unexpected {type(error).__name__}: {error}")
        raise
    log.info(
        "run %s: %d done, %d failed, %d skipped; %s",
        run_id,
        len(outcome.done),
        len(outcome.failed),
        len(outcome.skipped),
        ", ".join(f"{key} {value:.2f}" for key, value in outcome.timings.items()),
    )


def _timeout_reason() -> str:
    return (
        f"batch not scored within PATCHQ_TASK_TIME_LIMIT_S={settings.task_time_limit_s}; "
        "lower PATCHQ_BATCH_SIZE or raise the limit"
    )


def _fail(sessions: sessionmaker[Session], run_id: int, image_ids: list[int], reason: str) -> None:
    with sessions.begin() as session:
        mark_failed(session, run_id, dict.fromkeys(image_ids, reason))
