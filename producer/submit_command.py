"""`patchq submit`: register a run's images and enqueue batches of their ids for the workers.

Submitting again under the same --run name continues that run: new images are added and only
images that are still pending are enqueued, so a lost queue (a Redis restart) is refilled by
running the same command again. Done images are never scored twice.
"""

from __future__ import annotations

import argparse

from common.data.locations import to_location
from common.settings import Settings
from common.store.connection import open_database
from producer.submission import SPLITS, enqueue_pending, find_images, register_run
from worker.broker_check import broker_app


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="enqueue images for the workers (needs PATCHQ_BROKER_URL)",
        description=(
            "Register SOURCE's images in a run, each with its category's latest model, and send "
            "batches of image ids to the queue (PATCHQ_QUEUE) for `patchq worker` processes. "
            "SOURCE is a data root (seed or MVTec layout; its test images by default), a folder "
            "of images, or a .csv/.txt manifest of paths with an optional label column. "
            "Follow progress with `patchq status RUN`."
        ),
    )
    parser.add_argument(
        "source",
        type=to_location,
        metavar="SOURCE",
        help="data root, folder, manifest, or s3://bucket/prefix",
    )
    parser.add_argument(
        "--category",
        action="append",
        help="category (repeatable; a data root defaults to all, a folder or manifest needs one)",
    )
    parser.add_argument(
        "--run", dest="run_name", help="run name; an existing name continues that run"
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="test", help="which images of a data root (default test)"
    )
    parser.add_argument("--batch-size", type=int, help="images per task (PATCHQ_BATCH_SIZE)")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="continuing a run: put its failed images back in the queue (after fixing the cause)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load({"batch_size": args.batch_size})
    records = find_images(args.source, args.category, args.split)
    app = broker_app(settings)
    with open_database(settings.database_url) as (_, sessions):
        submission = register_run(
            sessions, records, args.run_name, str(args.source), settings.batch_size,
            args.retry_failed,
        )  # fmt: skip
        batches = enqueue_pending(
            app, sessions, submission.run_id, settings.batch_size, settings.queue
        )
    print(
        f"run {submission.run_name} (id {submission.run_id}): {submission.added} new images, "
        f"{submission.retried} failed ones retried, "
        f"{submission.pending} pending -> {batches} batches on queue {settings.queue!r}; "
        f"follow it with `patchq status {submission.run_name}`"
    )
    return 0
