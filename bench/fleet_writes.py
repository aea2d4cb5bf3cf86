"""Fleet write ceiling: how many score rows a second one PostgreSQL takes from N workers.

Each simulated worker is a separate process doing what `patchq worker` does around the model,
with the model replaced by nothing: take a batch of image ids from a real Redis list, claim it
in PostgreSQL (`claim_batch`: read the rows, lease the pending ones; one transaction), then
write the batch's scores with the real multi-row upsert (`upsert_scores`: INSERT .. ON CONFLICT DO
UPDATE plus marking the images done: one transaction). Rows carry patch maps and embeddings of
the real size (28x28 float16 map: Lite0 at 224 px; 152-value embedding), random values.

For each worker count in --workers it reports sustained rows/s (all batches of all workers over
the wall time from the first claim to the last commit) and the mean transaction times. On a
machine where the workers and PostgreSQL share few cores the figure is a lower bound of what a
dedicated database server takes.

    python -m bench.fleet_writes --workers 1,2,4 --batches 60
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import redis
from sqlalchemy import create_engine, text

from bench.scale_tools import throwaway_database
from common.store.connection import make_engine, make_session_factory, open_database
from common.store.image_rows import ImageRow, pending_image_ids, register_images
from common.store.leases import Lease, claim_batch
from common.store.model_rows import store_model
from common.store.run_rows import create_run
from common.store.score_rows import upsert_scores

REDIS_URL = "redis://127.0.0.1:6379/0"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure, in order")
    parser.add_argument("--batches", type=int, default=60, help="batches per worker per round")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch")
    parser.add_argument("--map-size", type=int, default=28, help="patch map side (28: Lite0 224)")
    parser.add_argument("--embedding-dim", type=int, default=152, help="pooled embedding size")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rounds = []
    with throwaway_database() as url:
        with open_database(url) as (_, sessions), sessions.begin() as session:
            model_id = store_model(session, "cam", b"x", "0" * 64, "none", {}, None, 1)
        for workers in (int(n) for n in args.workers.split(",")):
            rounds.append(_round(url, model_id, workers, args))
        _database_size(url)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "rounds": rounds}))
    return 0


def _round(url: str, model_id: int, workers: int, args: argparse.Namespace) -> dict[str, float]:
    """Register a fresh run, queue its batches, let `workers` processes drain the queue."""
    images = workers * args.batches * args.batch_size
    queue = f"bench-fleet-writes-{uuid.uuid4().hex[:8]}"
    with open_database(url) as (_, sessions), sessions.begin() as session:
        run_id = create_run(session, queue, "bench", args.batch_size)
        rows: list[ImageRow] = [
            {"category": "cam", "path": f"/archive/{i:09d}.png", "model_id": model_id}
            for i in range(images)
        ]
        register_images(session, run_id, rows)
        ids = pending_image_ids(session, run_id)
    broker = redis.Redis.from_url(REDIS_URL)
    try:
        broker.rpush(queue, *(json.dumps(ids[i : i + args.batch_size])
                              for i in range(0, len(ids), args.batch_size)))  # fmt: skip
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            outcomes = pool.starmap(
                _worker, [(url, run_id, queue, args.map_size, args.embedding_dim)] * workers
            )
    finally:
        broker.delete(queue)
    start = min(o["start"] for o in outcomes)
    wall = max(o["end"] for o in outcomes) - start
    written = sum(o["rows"] for o in outcomes)
    figures = {
        "workers": workers,
        "rows": written,
        "wall_s": round(wall, 2),
        "rows_per_s": round(written / wall),
        "claim_ms": round(1000 * np.mean([o["claim_s"] for o in outcomes]) / args.batches, 1),
        "write_ms": round(1000 * np.mean([o["write_s"] for o in outcomes]) / args.batches, 1),
    }
    print(
        f"{workers:>2} workers: {written:,} rows in {wall:.1f} s = "
        f"{figures['rows_per_s']:,} rows/s "
        f"(per batch of {args.batch_size}: claim {figures['claim_ms']} ms, "
        f"write {figures['write_ms']} ms)"
    )
    return figures


def _worker(url: str, run_id: int, queue: str, map_size: int, dim: int) -> dict[str, float]:
    """Drain the queue like a worker with a no-op model; returns its counts and times."""
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    broker = redis.Redis.from_url(REDIS_URL)
    rng = np.random.default_rng(os.getpid())
    lease = Lease(f"bench-{os.getpid()}")
    totals = {"rows": 0, "claim_s": 0.0, "write_s": 0.0, "start": time.time(), "end": 0.0}
    while (item := broker.lpop(queue)) is not None:
        batch = json.loads(item)
        started = time.perf_counter()
        with sessions.begin() as session:
            pending = sorted(claim_batch(session, batch, lease).attempts)
        claimed = time.perf_counter()
        rows = [
            {"run_id": run_id, "image_id": image_id, "score": float(rng.random()),
             "patch_map": rng.random((map_size, map_size), np.float32),
             "embedding": rng.random(dim, np.float32), "worker": "bench", "duration_ms": 0.0}
            for image_id in pending
        ]  # fmt: skip
        with sessions.begin() as session:
            upsert_scores(session, rows)
        totals["claim_s"] += claimed - started
        totals["write_s"] += time.perf_counter() - claimed
        totals["rows"] += len(rows)
    totals["end"] = time.time()
    engine.dispose()
    return totals


def _database_size(url: str) -> None:
    engine = create_engine(url)
    with engine.connect() as connection:
        size = connection.scalar(text("SELECT pg_total_relation_size('scores')"))
        count = connection.scalar(text("SELECT count(*) FROM scores"))
    engine.dispose()
    print(f"scores table: {size / 2**20:,.0f} MB for {count:,} rows ({size / count:,.0f} B/row)")


if __name__ == "__main__":
    raise SystemExit(main())
