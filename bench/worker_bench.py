"""Scoring throughput: in-process vs 1 and 2 `patchq worker` processes, on the same images.

    .venv/bin/python -m bench.worker_bench [--images 160] [--image-size 224] [--batch-size 16]

Fits one synthetic category once, then scores the same test images three times, each as a new
run in one results database: in this process (`score_batch` called in a loop, as `patchq run`
does without a broker), then through Redis with one and with two worker processes. Throughput
is images / wall time from the first batch sent to the last image done, so the workers' model
loading (once per process, on its first batch) is included. The time split (model load,
decode, backbone, search, DB write) is what score_batch reports, summed over all batches; for
the workers it is read back from their log lines. Each worker process gets
OMP_NUM_THREADS = cores / workers, so two workers do not oversubscribe the CPU.

Needs Redis (--broker, default the local server's database 15) and writes everything to a
temporary folder.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from common.data.layouts import discover
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import fit_category
from common.engine.patchcore import PatchCoreConfig
from common.scoring import TIMING_KEYS
from common.settings import Settings
from common.store.database import open_database, run_progress, store_model
from common.store.schema import Image, Run
from producer.pipeline import score_in_process
from producer.submission import Submission, broker_app, enqueue_pending, find_images, register_run
from tests.synthetic import make_seed_layout

ROOT = Path(__file__).parents[1]
TIMING_LINE = re.compile(r"(\w+_s) ([0-9.]+)")
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 1800


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=160, help="test images to score")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16, help="images per task")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--database-url", help="results database (default: a temporary SQLite)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="patchq-bench-") as tmp:
        bench(Path(tmp), args)


def bench(tmp: Path, args: argparse.Namespace) -> None:
    env = {
        "PATCHQ_BROKER_URL": args.broker,
        "PATCHQ_DATABASE_URL": args.database_url or f"sqlite:///{tmp / 'bench.db'}",
        "PATCHQ_QUEUE": f"bench-{uuid.uuid4().hex[:8]}",
        "PATCHQ_DEVICE": "cpu",
        "PATCHQ_BATCH_SIZE": str(args.batch_size),
        "PATCHQ_MODEL_CACHE_DIR": str(tmp / "models"),
    }
    settings = Settings.load({k.removeprefix("PATCHQ_").lower(): v for k, v in env.items()})
    with open_database(settings.database_url) as (_, sessions):
        root = tmp / "data"
        make_seed_layout(root, "tex", n_good=30, n_bad=4, n_test=args.images, size=args.image_size)
        config = PatchCoreConfig(image_size=args.image_size, coreset_ratio=0.1)
        print(f"fitting on 30 synthetic {args.image_size} px images ...", flush=True)
        model = fit_category(discover(root), config, device="cpu", progress=False).model
        data = save_artifact(model, "tex")
        with sessions.begin() as session:
            store_model(session, "tex", data, artifact_hash(data), config.backbone, {}, None, 1)
        records = find_images(root, ["tex"], "test")

        results: list[tuple[str, float, dict[str, float]]] = []
        submission = register_run(sessions, records, "in-process", "bench", args.batch_size)
        start = time.perf_counter()
        timings = score_in_process(sessions, submission.run_id, settings, progress=False)
        results.append(("in-process", time.perf_counter() - start, timings))
        for workers in (1, 2):
            name = f"{workers}-worker"
            submission = register_run(sessions, records, name, "bench", args.batch_size)
            results.append(
                (name, *score_on_workers(tmp, env, settings, sessions, submission, workers))
            )
        with sessions() as session:
            runs = session.execute(
                select(Run.name, Image.status, func.count())
                .join(Image)
                .group_by(Run.name, Image.status)
            ).all()
    not_done = [(run, status, count) for run, status, count in runs if status != "done"]
    if not_done:
        raise SystemExit(f"some images were not scored: {not_done}")

    cores = os.cpu_count()
    print(
        f"\n{args.images} images of {args.image_size} px, batches of {args.batch_size}, "
        f"{config.backbone}, {cores} CPU cores, {env['PATCHQ_DATABASE_URL'].split(':')[0]}"
    )
    header = f"{'path':<12}{'images/s':>9}{'wall s':>8}" + "".join(f"{k:>12}" for k in TIMING_KEYS)
    print(header + "\n" + "-" * len(header))
    for label, wall, split in results:
        row = f"{label:<12}{args.images / wall:>9.1f}{wall:>8.1f}"
        print(row + "".join(f"{split[k]:>12.1f}" for k in TIMING_KEYS))
    print("(time split: seconds summed over batches and worker processes)")


def score_on_workers(
    tmp: Path,
    env: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    submission: Submission,
    workers: int,
) -> tuple[float, dict[str, float]]:
    """Start `workers` patchq worker processes, enqueue the run, wait; (wall s, time split)."""
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    logs = [tmp / f"w{workers}-{i}.log" for i in range(workers)]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for i, log in enumerate(logs):
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "producer.cli", "worker", f"--hostname=b{i}@%h"],
                        cwd=tmp,
                        env=os.environ
                        | env
                        | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": threads},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        _wait(lambda: all(" ready." in log.read_text() for log in logs), START_TIMEOUT_S)
        start = time.perf_counter()
        app = broker_app(settings)
        enqueue_pending(app, sessions, submission.run_id, settings.batch_size, settings.queue)

        def finished() -> bool:
            with sessions() as session:
                return sum(r.pending for r in run_progress(session, submission.run_id)) == 0

        _wait(finished, RUN_TIMEOUT_S, poll_s=0.2)
        wall = time.perf_counter() - start
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    split = dict.fromkeys(TIMING_KEYS, 0.0)
    for log in logs:
        for key, value in TIMING_LINE.findall(log.read_text()):
            if key in split:
                split[key] += float(value)
    return wall, split


def _wait(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s")
        time.sleep(poll_s)


if __name__ == "__main__":
    main()
