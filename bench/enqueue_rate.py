"""Enqueueing rate: how many batch messages per second `worker.broker.send_id_batches` puts
on the local Redis, the step `patchq submit` and the workers' sweep share.

Sends --tasks batches of --batch-size ids to a private queue (deleted afterwards) in a fresh
process of the checkout `--code`, so the code before a change can be measured beside it on
the same machine:

    python -m bench.enqueue_rate --tasks 20000
    git worktree add build/before HEAD~1
    python -m bench.enqueue_rate --tasks 20000 --code build/before
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from bench.scale_tools import REPO, check, python

REDIS_URL = "redis://127.0.0.1:6379/0"
SEND = """
import json, time, uuid
import redis
from common.settings import Settings
from worker.broker import send_id_batches
from worker.config import make_app
queue = "bench-enqueue-" + uuid.uuid4().hex[:8]
app = make_app(Settings.load())
batches = ([i * {batch}, *range(i * {batch} + 1, (i + 1) * {batch})] for i in range({tasks}))
start = time.perf_counter()
sent = send_id_batches(app, 1, batches, queue)
seconds = time.perf_counter() - start
client = redis.Redis.from_url({url!r})
queued = client.llen(queue)
client.delete(queue)
print(json.dumps({{"sent": sent, "queued": queued, "seconds": seconds}}))
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=20_000, help="batch messages to send")
    parser.add_argument("--batch-size", type=int, default=32, help="image ids per message")
    parser.add_argument("--code", type=Path, default=REPO, help="patchq checkout to measure")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    script = SEND.format(tasks=args.tasks, batch=args.batch_size, url=REDIS_URL)
    measured = check(python(script, {"PATCHQ_BROKER_URL": REDIS_URL}, args.code))
    figures = json.loads(measured.stdout.strip().splitlines()[-1])
    if figures["queued"] != args.tasks:
        raise SystemExit(f"sent {args.tasks} messages but {figures['queued']} are queued")
    rate = args.tasks / figures["seconds"]
    print(
        f"{args.tasks:,} tasks of {args.batch_size} ids in {figures['seconds']:.2f} s: "
        f"{rate:,.0f} tasks/s = {rate * args.batch_size:,.0f} images/s ({args.code})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
