"""Batches sent in Redis pipelines arrive as the same Celery task messages, all and in order."""

from __future__ import annotations

import uuid

import redis
from celery import Celery
from kombu.simple import SimpleQueue

from common.settings import Settings
from worker.broker import PIPELINE_MESSAGES, send_batches, send_id_batches
from worker.config import TASK_NAME, make_app

# More than two pipelines' worth, the last one partly filled.
N_BATCHES = 2 * PIPELINE_MESSAGES + 7


def test_pipelined_batches_arrive_as_celery_tasks_in_order(shared_broker: str) -> None:
    queue = f"test-broker-{uuid.uuid4().hex[:8]}"
    app = make_app(Settings.load({"broker_url": shared_broker, "queue": queue}))
    batches = [[3 * n, 3 * n + 1, 3 * n + 2] for n in range(N_BATCHES)]
    try:
        assert send_id_batches(app, 7, iter(batches), queue) == N_BATCHES
        assert send_batches(app, 8, [1, 2, 3, 4, 5], 2, queue) == 3
        received = _receive(app, queue, N_BATCHES + 3)
        assert redis.Redis.from_url(shared_broker).llen(queue) == 0  # nothing more was sent
    finally:
        redis.Redis.from_url(shared_broker).delete(queue)
    expected = [[7, batch] for batch in batches] + [[8, [1, 2]], [8, [3, 4]], [8, [5]]]
    assert [args for _, args, _ in received] == expected
    assert {name for name, _, _ in received} == {TASK_NAME}
    assert received[0][2] == "(7, [3 ids 0..2])"  # what logs and Flower show


def _receive(app: Celery, queue: str, count: int) -> list[tuple[str, list[object], str]]:
    """(task name, args, argsrepr) of the next `count` messages on `queue`, in delivery order."""
    received = []
    with app.connection_for_read() as connection:
        simple = SimpleQueue(connection, app.amqp.queues[queue])
        for _ in range(count):
            message = simple.get(timeout=5)
            args, _, _ = message.decode()
            received.append((message.headers["task"], args, message.headers["argsrepr"]))
            message.ack()
        simple.close()
    return received
