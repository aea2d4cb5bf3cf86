"""Putting batches on the queue and looking at its length: shared by `patchq submit` and the
workers' sweep, so a requeued batch travels exactly like a submitted one."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from celery import Celery
from kombu import Producer
from kombu.exceptions import BatchPublishError

from common.iterables import chunked
from worker.config import TASK_NAME

# Messages per Redis pipeline: one round trip sends them all (a message is ~0.5 KB at 32 ids).
PIPELINE_MESSAGES = 1_000
SEND_ATTEMPTS = 3
RETRY_PAUSE_S = 0.5


def send_batches(
    app: Celery, run_id: int, image_ids: Sequence[int], batch_size: int, queue: str
) -> int:
    """Send `image_ids` of run `run_id` as batches of ids; returns the number of batches."""
    ids = list(image_ids)
    batches = (ids[start : start + batch_size] for start in range(0, len(ids), batch_size))
    return send_id_batches(app, run_id, batches, queue)


def send_id_batches(app: Celery, run_id: int, batches: Iterable[list[int]], queue: str) -> int:
    """Send each batch of ids as one task, PIPELINE_MESSAGES tasks per broker round trip;
    returns how many were sent.

    `batches` may be a stream (submit pages through millions of pending ids with it). Sent one
    at a time, a 10M-image run's messages cost one round trip each, which made enqueueing the
    slowest part of a submit; kombu's producer batch buffers them in a Redis pipeline instead
    (other transports publish each message at once). The messages are the ones `send_task`
    always sent, so workers see no difference.
    """
    sent = 0
    with app.producer_or_acquire() as producer:
        for chunk in chunked(batches, PIPELINE_MESSAGES):
            _send_chunk(app, producer, run_id, chunk, queue)
            sent += len(chunk)
    return sent


def _send_chunk(
    app: Celery, producer: Producer, run_id: int, chunk: list[list[int]], queue: str
) -> None:
    """Publish one chunk in one pipeline, sending it again whole if the connection broke.

    A pipeline cut off mid-way may have delivered part of the chunk; sending those batches a
    second time is harmless, because images are claimed and written once in SQL (a duplicate
    message finds its images done or leased), whereas a lost one would wait for the sweep.
    """
    retryable = (BatchPublishError, *producer.connection.connection_errors)
    for attempt in range(1, SEND_ATTEMPTS + 1):
        try:
            producer.maybe_declare(app.amqp.queues[queue])
            with producer.batch(max_size=PIPELINE_MESSAGES):
                for batch in chunk:
                    app.send_task(
                        TASK_NAME,
                        args=[run_id, batch],
                        queue=queue,
                        producer=producer,
                        declare=[],  # declared once above, not once per message
                        argsrepr=_args_summary(run_id, batch),
                    )
            return
        except retryable:
            if attempt == SEND_ATTEMPTS:
                raise
            time.sleep(RETRY_PAUSE_S * attempt)


def _args_summary(run_id: int, batch: list[int]) -> str:
    """What logs and Flower show of a task's arguments: Celery's own bounded repr of the id
    list cost more than the rest of the send together."""
    ids = f"{len(batch)} ids {batch[0]}..{batch[-1]}" if batch else "no ids"
    return f"({run_id}, [{ids}])"


def queue_length(app: Celery, queue: str) -> int:
    """Batches waiting on `queue` (a broker that lost its data has an empty queue)."""
    with app.connection_for_read() as connection:
        return connection.default_channel.queue_declare(queue=queue).message_count
