"""Aggregation at scale: `patchq aggregate`, `report` and `status` of a synthetic run of
--images scored images on a throwaway PostgreSQL database.

The run is seeded in SQL (no image is scored): one category, a tiny real model artifact fitted
on synthetic 64 px images (aggregation reads its held-out normals and preprocessing), 10 % of
the images labelled (half of those anomalous, scored higher), every image done with a score
row. Score rows carry a 2x2 patch map: aggregation reads maps only for the images a figure
shows, so their size does not change these figures (bench/fleet_writes.py writes real-size
maps). Each command runs in a fresh process; wall time and peak resident memory are reported.

    python -m bench.aggregate_scale --images 200000
    python -m bench.aggregate_scale --images 10000000 --keep       # prints the database's URL
    python -m bench.aggregate_scale --images 10000000 --database URL --code OLD
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory

from sqlalchemy import create_engine, text

from bench.scale_tools import REPO, check, patchq, python, report, throwaway_database
from synthetic.layouts import make_seed_layout

RUN = "bench"
CATEGORY = "cam"
# Fits the tiny model with the checkout under test, so that it reads it, and stores it with an
# empty run. The images come from this checkout: one under test may predate synthetic/.
SETUP = """
from pathlib import Path
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.data.layouts import discover
from common.store.connection import open_database
from common.store.model_rows import store_model
from common.store.run_rows import create_run
config = PatchCoreConfig(image_size=64, coreset_ratio=0.25)
result = fit_category(discover(Path({root!r})), config, holdout=0.25, device="cpu", progress=False)
data = save_artifact(result.model, {category!r})
with open_database({url!r}) as (_, sessions), sessions.begin() as session:
    store_model(session, {category!r}, data, artifact_hash(data), config.backbone,
                config.to_dict(), None, 1)
    create_run(session, {run!r}, "synthetic", 32)
"""
SEED = [
    """INSERT INTO images (run_id, category, path, split, label, defect_type, model_id, status,
                          attempts, updated_at)
       SELECT 1, '{category}', '/archive/img' || lpad(i::text, 9, '0') || '.png',
              'test', CASE WHEN i % 10 = 0 THEN (i / 10) % 2 END, NULL, 1, 'done', 1, now()
       FROM generate_series(1, {images}) AS i""",
    """INSERT INTO scores (run_id, image_id, category, score, patch_map, map_height, map_width,
                          worker, duration_ms, scored_at)
       SELECT run_id, id, category, random() + coalesce(label, 0) * 0.8,
              '\\x0000000000000000'::bytea, 2, 2, 'bench', 30,
              now() - (id % 36000) * interval '100 milliseconds'
       FROM images""",
    "VACUUM ANALYZE images",
    "VACUUM ANALYZE scores",
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200_000, help="scored images in the run")
    parser.add_argument("--code", type=Path, default=REPO, help="patchq checkout to measure")
    parser.add_argument(
        "--steps", default="status,aggregate,report", help="commands to measure, in order"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database (name printed)")
    parser.add_argument(
        "--database", help="measure this already seeded database (from --keep) instead"
    )
    parser.add_argument("--json", type=Path, help="write the figures here too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, object] = {"images": args.images, "code": str(args.code)}
    with TemporaryDirectory() as folder, _database(args, folder) as url:
        env = {"PATCHQ_DATABASE_URL": url}
        commands = {
            "status": ["status", RUN],
            "aggregate": ["aggregate", RUN, "--out", f"{folder}/out"],
            "report": ["report", RUN, "--out", f"{folder}/out"],
        }
        for step in args.steps.split(","):
            results[step] = report(step, check(patchq(commands[step], env, args.code)), args.images)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


@contextmanager
def _database(args: argparse.Namespace, folder: str) -> Iterator[str]:
    """The seeded database to measure: --database as given, else a new one seeded now."""
    if args.database:
        yield args.database
        return
    with throwaway_database(args.keep) as url:
        make_seed_layout(Path(folder) / "data", CATEGORY, n_good=12, n_bad=4, n_test=2)
        setup = SETUP.format(root=f"{folder}/data", category=CATEGORY, url=url, run=RUN)
        check(python(setup, {"PATCHQ_DATABASE_URL": url}, args.code))
        _seed(url, args.images)
        if args.keep:
            print(f"seeded database: {url}")
        yield url


def _seed(url: str, images: int) -> None:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    start = time.perf_counter()
    with engine.connect() as connection:
        for statement in SEED:
            connection.execute(text(statement.format(category=CATEGORY, images=images)))
    engine.dispose()
    print(f"seeded {images:,} scored images in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
