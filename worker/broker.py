"""Putting batches on the queue and looking at its length: shared by `patchq submit` and the
workers' sweep, so a requeued batch travels exactly like a submitted one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from celery import Celery

from worker.config import TASK_NAME


def send_batches(
    app: Celery, run_id: int, image_ids: Sequence[int], batch_size: int, queue: str
) -> int:
    """Send `image_ids` of run `run_id` as batches of ids; returns the number of batches."""
    ids = list(image_ids)
    batches = (ids[start : start + batch_size] for start in range(0, len(ids), batch_size))
    return send_id_batches(app, run_id, batches, queue)


def send_id_batches(app: Celery, run_id: int, batches: Iterable[list[int]], queue: str) -> int:
    """Send each batch of ids as one task over one connection; returns how many were sent.

    `batches` may be a stream (submit pages through millions of pending ids with it)."""
    sent = 0
    with app.producer_or_acquire() as producer:
        for batch in batches:
            app.send_task(
                TASK_NAME,
                args=[run_id, batch],
                queue=queue,
                producer=producer,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_max": 2},
            )
            sent += 1
    return sent


def queue_length(app: Celery, queue: str) -> int:
    """Batches waiting on `queue` (a broker that lost its data has an empty queue)."""
    with app.connection_for_read() as connection:
        return connection.default_channel.queue_declare(queue=queue).message_count
