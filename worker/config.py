"""How patchq's Celery app is configured from Settings, for at-least-once delivery.

The producer builds its app here without importing worker.app, whose import builds the
workers' app from the environment (and so needs PATCHQ_BROKER_URL). Delivery settings:

- acks late + reject on worker lost: a batch is acknowledged only after its rows are
  committed, and a worker process that dies mid-batch hands the batch back to the queue;
- prefetch 1 per pool slot: a worker holds at most the batches it is scoring (one per pool
  process; PATCHQ_PIPELINE_DEPTH with the default threads pool, each acknowledged after its own
  write), so a lost worker strands little;
- leases in SQL (common.store.leases) bring back a batch whose whole worker vanished (SIGKILL,
  power loss) within PATCHQ_LEASE_S; Redis's visibility timeout (PATCHQ_VISIBILITY_TIMEOUT_S,
  longer than the task time limit) only backs them up;
- the redelivery limit is counted in the database (images.attempts), not by the broker, so it
  survives broker restarts; see common.scoring;
- no result backend: results are rows in SQL, never Celery payloads.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from common.settings import Settings, SettingsError

TASK_NAME = "patchq.score_batch"
SOFT_LIMIT_MARGIN_S = 30  # time the task gets to record a timeout before it is killed


def make_app(settings: Settings) -> Celery:
    """A Celery app for `settings`; the producer and the workers build it the same way."""
    if not settings.broker_url:
        raise SettingsError(
            "PATCHQ_BROKER_URL is not set; workers need a broker such as redis://host:6379/0 "
            "(without one, `patchq run` scores in-process)"
        )
    app = Celery("patchq", broker=settings.broker_url, include=["worker.tasks"])
    limit = settings.task_time_limit_s
    restore_every_s = max(1, min(10, settings.visibility_timeout_s // 4))
    app.conf.update(
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue)],
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=limit,
        task_soft_time_limit=limit - SOFT_LIMIT_MARGIN_S
        if limit > 2 * SOFT_LIMIT_MARGIN_S
        else limit * 0.8,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for batches of vanished workers often enough to matter at this timeout.
            "unacked_restore_interval": restore_every_s,
            "unacked_restore_throttle": 1,
            # The sweep takes a Redis mutex that lives this long if its holder is SIGKILLed
            # mid-sweep; kombu's 300 s default would then hold up every redelivery that long.
            "unacked_mutex_expire": restore_every_s * 3,
            "socket_connect_timeout": 5,
        },
        worker_send_task_events=False,
    )
    return app
