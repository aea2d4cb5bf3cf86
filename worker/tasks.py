"""The scoring task: common.scoring.score_batch plus what only a queue needs.

Per worker process, the database engine and the model provider are created on the first task,
i.e. after the prefork pool has forked, so no connection, CUDA context or FAISS index is ever
shared with a parent process.
"""

from __future__ import annotations

import logging
import os
from functools import cache

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import PatchqError
from common.scoring import ModelProvider, score_batch
from common.store.database import DatabaseError, make_engine, make_session_factory, mark_failed
from worker.app import app, settings
from worker.config import TASK_NAME

log = logging.getLogger(__name__)


@cache
def _process_state(pid: int) -> tuple[sessionmaker[Session], ModelProvider]:
    """This process's session factory and model provider (keyed by pid: never inherited)."""
    sessions = make_session_factory(make_engine(settings.database_url))
    return sessions, ModelProvider(sessions, settings.model_cache_dir, settings.device)


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
        sessions, provider = _process_state(os.getpid())
    except DatabaseError as error:  # unreachable at this moment: try again later
        raise self.retry(exc=error, countdown=5) from error
    worker_name = f"{self.request.hostname}/{os.getpid()}"
    try:
        outcome = score_batch(
            sessions,
            run_id,
            image_ids,
            provider,
            worker_name,
            max_deliveries=settings.max_redeliveries + 1,
        )
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
