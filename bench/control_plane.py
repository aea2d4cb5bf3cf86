"""Control-plane scale: `patchq submit` of a large manifest and `patchq status` of a large run.

Writes a manifest of --images generated paths (registration never opens the files, so they need
not exist), then, on a throwaway PostgreSQL database and the local Redis:

1. `patchq submit` of the manifest: wall time, images/s and peak resident memory of the
   process, registration and enqueueing together;
2. (--resubmit) the same submit again: nothing may be added (idempotent);
3. `patchq status` after marking two thirds of the run done with synthetic score rows and 1 %
   failed (scores need no real images), as a long-running run would look.

`--code DIR` runs another checkout's patchq (e.g. the code before issue 12) for a before/after
figure on the same machine. The queue is private to the run and deleted afterwards.

    python -m bench.control_plane --images 200000
    python -m bench.control_plane --images 10000000 --batch-size 512
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from tempfile import TemporaryDirectory

import redis
from sqlalchemy import create_engine, text

from bench.scale_tools import REPO, check, patchq, python, report, throwaway_database

REDIS_URL = "redis://127.0.0.1:6379/0"
CATEGORY = "cam"
RUN = "bench"
# A model row so that submit finds the category's model; nothing here loads the artifact.
STORE_MODEL = """
from common.store.connection import open_database
from common.store.model_rows import store_model
with open_database({url!r}) as (_, sessions), sessions.begin() as session:
    store_model(session, {category!r}, b"x", "0" * 64, "none", {{}}, None, 1)
"""
# Two thirds done with a score row each (a 2x2 map: status reads no maps), 1 % failed.
SEED_PROGRESS = [
    """UPDATE images SET status = CASE WHEN id % 100 = 0 THEN 'failed'
                                    WHEN id % 3 <> 0 THEN 'done' ELSE 'pending' END,
                         error = CASE WHEN id % 100 = 0 THEN 'synthetic failure' END""",
    """INSERT INTO scores (run_id, image_id, category, score, patch_map, map_height, map_width,
                           worker, duration_ms, scored_at)
       SELECT run_id, id, category, random(), '\\x0000000000000000'::bytea, 2, 2, 'bench', 30,
              now() - (id % 36000) * interval '100 milliseconds'
       FROM images WHERE status = 'done'""",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000, help="paths in the manifest")
    parser.add_argument("--batch-size", type=int, default=32, help="images per queued task")
    parser.add_argument("--code", type=Path, default=REPO, help="patchq checkout to measure")
    parser.add_argument("--resubmit", action="store_true", help="submit twice (idempotency)")
    parser.add_argument("--no-status", action="store_true", help="skip the status step")
    parser.add_argument("--keep", action="store_true", help="keep the database (name printed)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    return parser.parse_args(argv)


def write_manifest(path: Path, count: int) -> None:
    """`count` distinct absolute paths, 8 camera folders, written as a stream."""
    with path.open("w") as manifest:
        for start in range(0, count, 100_000):
            manifest.writelines(
                f"/archive/cam{i % 8}/img{i:09d}.png\n"
                for i in range(start, min(count, start + 100_000))
            )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, object] = {"images": args.images, "code": str(args.code)}
    queue = f"bench-control-plane-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(REDIS_URL)
    with TemporaryDirectory() as folder, throwaway_database(args.keep) as url:
        manifest = Path(folder) / "paths.txt"
        write_manifest(manifest, args.images)
        env = {"PATCHQ_DATABASE_URL": url, "PATCHQ_BROKER_URL": REDIS_URL, "PATCHQ_QUEUE": queue}
        check(python(STORE_MODEL.format(url=url, category=CATEGORY), env, args.code))
        submit = ["submit", str(manifest), "--category", CATEGORY, "--run", RUN,
                  "--batch-size", str(args.batch_size)]  # fmt: skip
        try:
            results["submit"] = report("submit", check(patchq(submit, env, args.code)), args.images)
            results["queued_tasks"] = broker.llen(queue)
            broker.delete(queue)
            if args.resubmit:
                results["resubmit"] = report(
                    "resubmit", check(patchq(submit, env, args.code)), args.images
                )
        finally:
            broker.delete(queue)
        if not args.no_status:
            _seed_progress(url)
            results["status"] = report(
                "status", check(patchq(["status", RUN], env, args.code)), args.images
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _seed_progress(url: str) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    start = time.perf_counter()
    with engine.connect() as connection:
        for statement in SEED_PROGRESS:
            connection.execute(text(statement))
        connection.execute(text("VACUUM ANALYZE images"))  # what autovacuum does on a real run
        connection.execute(text("VACUUM ANALYZE scores"))
    engine.dispose()
    print(f"seeded progress rows in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
