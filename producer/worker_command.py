"""`patchq worker`: a Celery worker that scores batches from the queue.

GPU machines: run one worker per GPU, each pinned to its GPU with CUDA_VISIBLE_DEVICES, e.g.

    CUDA_VISIBLE_DEVICES=0 patchq worker --hostname gpu0@%h &
    CUDA_VISIBLE_DEVICES=1 patchq worker --hostname gpu1@%h &

By default the worker is pipelined and supervised: a small parent process
(worker.supervisor) runs Celery's `threads` pool with PATCHQ_PIPELINE_DEPTH threads in one
child process, one model, one heartbeat; while one batch is on the backbone the next is
claimed and decoded and the one before written (common.pipelined). The model, CUDA and FAISS
are created in that child, on its first batch. If an image kills the child (a decoder
crash), the parent requeues what the child held at once and starts a new one, and the batch
is isolated image by image until the image fails with "worker lost N times" (common.scoring).
`--pool prefork` (one batch at a time per pool process, Celery replaces a dead pool child)
and `--pool solo` (one batch at a time, in this process, unsupervised) are opt-ins.
"""

from __future__ import annotations

import argparse
import logging
import os

from common.settings import Settings
from common.store.connection import make_engine
from worker.broker_check import broker_app

SUPERVISED_POOL = "threads"

EPILOG = (
    "GPUs: one worker per GPU, each with CUDA_VISIBLE_DEVICES=N "
    "(e.g. `CUDA_VISIBLE_DEVICES=0 patchq worker --hostname gpu0@%h`). The model, CUDA and "
    "FAISS are initialised on the first batch, in the process that scores. "
    "Settings: PATCHQ_BROKER_URL, PATCHQ_DATABASE_URL, PATCHQ_QUEUE, PATCHQ_DEVICE, "
    "PATCHQ_MODEL_CACHE_DIR, PATCHQ_PIPELINE_DEPTH (batches in flight with the default pool), "
    "PATCHQ_TASK_TIME_LIMIT_S, PATCHQ_VISIBILITY_TIMEOUT_S, PATCHQ_MAX_REDELIVERIES, "
    "PATCHQ_LEASE_S, PATCHQ_HEARTBEAT_S. SIGTERM or Ctrl-C drains: the worker finishes its "
    "batches and exits. The default pool runs in a child process that is restarted if it "
    "dies (e.g. on an image that crashes the decoder), its batches requeued at once."
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
        "--concurrency",
        type=int,
        help="pool threads or processes (default: PATCHQ_PIPELINE_DEPTH threads; 1 process)",
    )
    parser.add_argument("--queues", help="comma-separated queues to consume (default PATCHQ_QUEUE)")
    parser.add_argument(
        "--hostname", help="node name, e.g. gpu0@%%h; must differ between workers on one machine"
    )
    parser.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    parser.add_argument(
        "--pool",
        default=SUPERVISED_POOL,
        choices=(SUPERVISED_POOL, "prefork", "solo"),
        help="Celery pool (default threads: batches overlap in one supervised process; "
        "prefork, solo: one batch at a time per process)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    broker_app(settings)  # a clear one-line error now beats a reconnect loop in the log
    make_engine(settings.database_url).dispose()  # idem for the database; nothing kept open
    from celery.utils.nodenames import default_nodename, host_format

    supervised = args.pool == SUPERVISED_POOL
    node = host_format(default_nodename(args.hostname or f"patchq-{os.getpid()}@%h"))
    queues = args.queues or settings.queue
    concurrency = args.concurrency or (settings.pipeline_depth if supervised else 1)
    celery_args = [
        f"--concurrency={concurrency}",
        f"--queues={queues}",
        f"--loglevel={args.loglevel}",
        f"--pool={args.pool}",
        "--without-mingle",  # nothing to sync between workers: the database holds all state
        "--without-gossip",
        f"--hostname={node}",
    ]
    if supervised:
        from worker.supervisor import Supervisor

        logging.basicConfig(format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
        return Supervisor(celery_args, node, queues.split(",")[0], settings).run()
    from worker.app import app  # the app the task is registered on

    app.worker_main(["worker", *celery_args])
    return 0
