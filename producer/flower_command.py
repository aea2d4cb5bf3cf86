"""`patchq flower`: the Flower dashboard for patchq's Celery app, with the login from settings.

Queue lengths show from the moment batches are submitted, before any worker starts: with no
worker up, Flower takes the queue names from the app's configuration (make_app declares
PATCHQ_QUEUE as the default queue and in task_queues), and for a Redis broker it asks Redis for
each queue's length itself (`--broker-api` is only for RabbitMQ's management API).
"""

from __future__ import annotations

import argparse
import os
import sys

from common.settings import Settings, mask_url
from worker.broker_check import broker_app

DEFAULT_ADDRESS = "127.0.0.1"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "flower",
        help="start the Flower dashboard for the workers and the queue",
        description=(
            "Start Flower on patchq's broker (PATCHQ_BROKER_URL) with the queue PATCHQ_QUEUE "
            "declared, so its length shows before workers start. The login is "
            "PATCHQ_FLOWER_BASIC_AUTH (user:password); without it Flower refuses API calls."
        ),
    )
    add_listen_arguments(parser, "PATCHQ_FLOWER_PORT")
    parser.set_defaults(run=run)


def add_listen_arguments(parser: argparse.ArgumentParser, port_setting: str) -> None:
    """--address and --port of a command that serves pages (flower, review)."""
    parser.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"address to listen on (default {DEFAULT_ADDRESS}; 0.0.0.0 inside a container)",
    )
    parser.add_argument("--port", type=int, help=f"port (default {port_setting})")


def run(args: argparse.Namespace) -> int:
    settings = Settings.load({"flower_port": args.port})
    app = broker_app(settings)  # a clear one-line error now beats Flower's reconnect loop
    if settings.flower_basic_auth:
        # Handed over in Flower's environment rather than as --basic_auth, which `ps` would show.
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    else:
        print(
            "warning: Flower has no login, so its pages are open and its API refuses every "
            "call; set PATCHQ_FLOWER_BASIC_AUTH=user:password",
            file=sys.stderr,
        )
    print(
        f"Flower on http://{args.address}:{settings.flower_port}/ for queue {settings.queue!r} "
        f"on {mask_url(app.conf.broker_url)}",
        flush=True,
    )
    argv = ["flower", f"--address={args.address}", f"--port={settings.flower_port}"]
    return app.start(argv) or 0
