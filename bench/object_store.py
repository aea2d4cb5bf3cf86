"""Archives in object storage (issue 24): what reading images from an S3 server costs a worker,
and how fast `patchq submit` registers a bucket prefix. Against moto's S3 server on 127.0.0.1
behind the tests' TCP forwarder (tests.object_server), which holds every request back
--delay-ms first, as a distant store would.

    python -m bench.object_store throughput --images 480 --delay-ms 20
    python -m bench.object_store listing --objects 100000

throughput: the same images scored by the pipelined in-process scorer (the code a default
worker runs) from local files and from the server, each after a warm-up, one model.
listing: `patchq submit s3://bucket/prefix/` of --objects objects in a fresh process (wall time,
peak RSS; SQLite results, a private Redis queue) beside a bare boto3 listing of the same prefix.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import redis

from bench.in_process import score_overlapping
from bench.worker_bench import fit_and_store
from common.data.locations import to_location
from common.engine.model_config import PatchCoreConfig
from common.scoring.model_cache import ModelProvider
from common.settings import Settings
from common.store.connection import open_database
from producer.submission import find_images, register_run
from tests.object_server import ANY_CREDENTIALS, REGION, ObjectServer, running_server

BROKER = "redis://127.0.0.1:6379/15"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    throughput = modes.add_parser("throughput", help="images/s from local disk vs the server")
    throughput.add_argument("--images", type=int, default=480)
    throughput.add_argument("--image-size", type=int, default=224)
    throughput.add_argument("--batch-size", type=int, default=16)
    throughput.add_argument("--delay-ms", type=float, default=20.0, help="added to every GET")
    listing = modes.add_parser("listing", help="submit of a bucket prefix vs a bare listing")
    listing.add_argument("--objects", type=int, default=100_000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="patchq-bench-") as tmp:
        if args.mode == "throughput":
            bench_throughput(Path(tmp), args)
        else:
            bench_listing(Path(tmp), args.objects)


def bench_throughput(tmp: Path, args: argparse.Namespace) -> None:
    with running_server(tmp) as server:
        server.proxy.delay_s = args.delay_ms / 1000  # type: ignore[union-attr]
        os.environ.update(server.env())
        settings = Settings.load({"batch_size": args.batch_size, "device": "cpu"})
        with open_database(f"sqlite:///{tmp / 'bench.db'}") as (_, sessions):
            config = PatchCoreConfig(image_size=args.image_size, coreset_ratio=0.1)
            _, local = fit_and_store(tmp / "data", sessions, config, args.images, "cpu")
            bucket = server.new_bucket()
            server.upload_tree(tmp / "data" / "tex" / "test", bucket, "tex")
            remote = list(find_images(to_location(f"s3://{bucket}/tex"), ["tex"]))
            provider = ModelProvider(sessions, tmp / "models", "cpu")
            rates = {}
            runs = [
                ("warm-up", local[: args.batch_size]),
                ("local", local),
                ("warm-up s3", remote[: args.batch_size]),
                ("s3", remote),
            ]
            for name, records in runs:
                run = register_run(sessions, records, name, "bench", args.batch_size).run_id
                start = time.perf_counter()
                timings = score_overlapping(sessions, run, settings, provider)
                rates[name] = len(records) / (time.perf_counter() - start)
                print(
                    f"{name:>10}: {rates[name]:6.1f} images/s, decode {timings['decode_s']:.1f} s"
                )
    print(
        f"{args.images} images of {args.image_size} px, {args.delay_ms:g} ms added per GET: "
        f"objects {rates['s3']:.1f} vs local {rates['local']:.1f} images/s = "
        f"{rates['s3'] / rates['local']:.2f}x"
    )


def bench_listing(tmp: Path, objects: int) -> None:
    with running_server(tmp) as server:
        bucket = server.new_bucket()
        print(f"uploading {objects:,} objects", flush=True)
        _fill(server, bucket, objects)
        listed, bare_s = _bare_listing(server, bucket)
        assert listed == objects, f"listed {listed} of {objects}"
        env = _submit_env(tmp, server)
        source = f"s3://{bucket}/archive/"
        wall_s, peak_mb, output = _submit(env, source)
        redis.Redis.from_url(BROKER).delete(env["PATCHQ_QUEUE"])
    print(output)
    print(
        f"{objects:,} objects: bare listing {bare_s:.1f} s ({objects / bare_s:,.0f}/s); "
        f"patchq submit {wall_s:.1f} s ({objects / wall_s:,.0f}/s, "
        f"{wall_s / bare_s:.2f}x the listing), peak RSS {peak_mb:,.0f} MB"
    )


# The submit process reports its own peak RSS (VmHWM): a child's ru_maxrss on Linux keeps the
# high-water mark of the forked copy of this (torch-loaded) bench process from before its exec.
SUBMIT = """
import atexit, sys
from producer.cli import main
def peak():
    status = open("/proc/self/status").read().splitlines()
    print(next(line for line in status if line.startswith("VmHWM")), file=sys.stderr)
atexit.register(peak)
sys.exit(main())
"""


def _submit(env: dict[str, str], source: str) -> tuple[float, float, str]:
    """`patchq submit SOURCE` in a fresh process: wall seconds, peak RSS in MB, its output."""
    argv = [sys.executable, "-c", SUBMIT, "submit", source, "--category", "tex", "--run", "r"]
    start = time.perf_counter()
    done = subprocess.run(
        argv, env={**os.environ, **env}, capture_output=True, text=True, check=False
    )
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"patchq submit failed:\n{done.stderr[-2000:]}")
    peak_kb = int(done.stderr.rsplit("VmHWM:", 1)[1].split()[0])
    return wall_s, peak_kb / 1024, done.stdout.strip()


def _fill(server: ObjectServer, bucket: str, objects: int) -> None:
    """Tiny objects with image names (submit never opens them), from 8 threads."""
    client = server.client()
    keys = [f"archive/{i // 1000:03d}/{i:06d}.png" for i in range(objects)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: client.put_object(Bucket=bucket, Key=key, Body=b"x"), keys))


def _bare_listing(server: ObjectServer, bucket: str) -> tuple[int, float]:
    """Keys under the prefix counted with boto3's paginator, through the same forwarder."""
    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=REGION,
        aws_access_key_id=ANY_CREDENTIALS.key_id,
        aws_secret_access_key=ANY_CREDENTIALS.secret,
    )
    start = time.perf_counter()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="archive/")
    count = sum(len(page.get("Contents", ())) for page in pages)
    return count, time.perf_counter() - start


def _submit_env(tmp: Path, server: ObjectServer) -> dict[str, str]:
    """A SQLite database holding a model for "tex" (submit refuses a category without one)."""
    database = f"sqlite:///{tmp / 'submit.db'}"
    with open_database(database) as (_, sessions):
        fit_and_store(tmp / "model-data", sessions, PatchCoreConfig(image_size=64), 2, "cpu")
    return {
        **server.env(),
        "PATCHQ_DATABASE_URL": database,
        "PATCHQ_BROKER_URL": BROKER,
        "PATCHQ_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
    }


if __name__ == "__main__":
    main()
