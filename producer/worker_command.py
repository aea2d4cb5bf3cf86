"""`patchq worker`: a Celery worker that scores batches from the queue.

GPU machines: run one worker process per GPU, each pinned to its GPU with
CUDA_VISIBLE_DEVICES and --concurrency 1, e.g.

    CUDA_VISIBLE_DEVICES=0 patchq worker --hostname gpu0@%h &
    CUDA_VISIBLE_DEVICES=1 patchq worker --hostname gpu1@%h &

The pool forks before any model is built: CUDA, the model and the FAISS index are created in
the process that scores, on its first batch (several processes sharing one GPU each hold a
copy of the model and mostly queue on the device).
"""

from __future__ import annotations

import argparse
import os

from common.settings import Settings
from common.store.database import make_engine
from producer.submission import broker_app

EPILOG = (
    "GPUs: one worker per GPU, each with CUDA_VISIBLE_DEVICES=N and --concurrency 1 "
    "(e.g. `CUDA_VISIBLE_DEVICES=0 patchq worker --hostname gpu0@%h`). The model, CUDA and "
    "FAISS are initialised in the pool process on its first batch, never before the fork. "
    "Settings: PATCHQ_BROKER_URL, PATCHQ_DATABASE_URL, PATCHQ_QUEUE, PATCHQ_DEVICE, "
    "PATCHQ_MODEL_CACHE_DIR, PATCHQ_TASK_TIME_LIMIT_S, PATCHQ_VISIBILITY_TIMEOUT_S, "
    "PATCHQ_MAX_REDELIVERIES, PATCHQ_LEASE_S, PATCHQ_HEARTBEAT_S. SIGTERM drains: the worker "
    "finishes its batch and exits."
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "worker",
        help="score queued batches (a Celery worker; one per GPU)",
        description=(
            "Start a Celery worker that takes batches of image ids from the queue, loads each "
            "category's model from the database (cached on disk by content hash), scores the "
            "images and writes scores and patch maps to the database."
        ),
        epilog=EPILOG,
    )
    parser.add_argument(
        "--concurrency", type=int, default=1, help="pool processes (default 1; 1 per GPU)"
    )
    parser.add_argument("--queues", help="comma-separated queues to consume (default PATCHQ_QUEUE)")
    parser.add_argument(
        "--hostname", help="node name, e.g. gpu0@%%h; must differ between workers on one machine"
    )
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    parser.add_argument(
        "--pool",
        default="prefork",
        choices=("prefork", "solo"),
        help="Celery pool (default prefork)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    broker_app(settings)  # a clear one-line error now beats a reconnect loop in the log
    make_engine(settings.database_url).dispose()  # idem for the database; nothing kept open
    from worker.app import app  # the app the task is registered on

    argv = [
        "worker",
        f"--concurrency={args.concurrency}",
        f"--queues={args.queues or settings.queue}",
        f"--loglevel={args.loglevel}",
        f"--pool={args.pool}",
        "--without-mingle",  # nothing to sync between workers: the database holds all state
        "--without-gossip",
        f"--hostname={args.hostname or f'patchq-{os.getpid()}@%h'}",
    ]
    app.worker_main(argv)
    return 0
