"""Scoring throughput: serial vs pipelined, in-process and in `patchq worker` processes.

    .venv/bin/python -m bench.worker_bench [--images 160] [--image-size 224] [--batch-size 16]
        [--workers 1 2] [--no-op-model]

Fits one synthetic category once, then scores the same test images several times, each as a
new run in one results database: in this process one batch after the other (`score_batch` in a
loop: "serial"), in this process with PATCHQ_PIPELINE_DEPTH batches overlapping ("in-process",
what `patchq run` does without a broker), then through Redis with one `--pool prefork` worker
(one batch at a time: "1-prefork") and with 1 and 2 default workers ("N-default": supervised,
pipelined, `--pool threads`). Every path scores one warm-up batch first (per worker process,
through a queue of its own), so the model load and first-call set-up are outside every timed
run alike; the workers' start-up and warm-up times are printed below the table. Throughput is
images / wall time from the first batch sent to the last image done. The time split (model
load, decode, backbone, search, DB write) is what the stages report, summed over all batches
(for workers, read back from their log lines); "overlap" is that sum over the wall time: above
1.0 the stages ran at the same time. Each worker process gets OMP_NUM_THREADS = cores /
workers, so two workers do not oversubscribe the CPU.

--no-op-model (the feed ceiling): the model is replaced by one that computes nothing
(bench.noop_model), so what is left is claim, decode and write. Every row also reports images
per CPU-second of the processes that scored (this one, or the workers'), i.e. images/s per
core: the figure a loaded machine disturbs least.

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

from bench.in_process import score_overlapping, score_serial
from bench.noop_model import NoOpProvider
from common.data.batches import decode_batch
from common.data.layouts import ImageRecord, discover
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from common.scoring.model_cache import ModelProvider
from common.scoring.stages import TIMING_KEYS
from common.settings import Settings
from common.store.connection import open_database
from common.store.model_rows import store_model
from common.store.run_rows import run_progress
from common.store.schema import Image, Run
from producer.submission import Submission, enqueue_pending, find_images, register_run
from synthetic.layouts import make_seed_layout
from worker.broker_check import broker_app

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
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2], help="pipelined worker counts to run"
    )
    parser.add_argument(
        "--no-op-model",
        action="store_true",
        help="feed ceiling: a model that computes nothing, in-process only",
    )
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
        config = PatchCoreConfig(image_size=args.image_size, coreset_ratio=0.1)
        model, records = fit_and_store(tmp / "data", sessions, config, args.images, "cpu")

        results: list[tuple[str, float, dict[str, float]]] = []
        start_ups: list[str] = []
        provider = ModelProvider(sessions, settings.model_cache_dir, settings.device)
        if args.no_op_model:
            probe = decode_batch([records[0].path], model.preprocessing).tensor
            provider = NoOpProvider(provider, probe)  # type: ignore[assignment]

        def register(name: str, subset: list[ImageRecord] | None = None) -> Submission:
            return register_run(sessions, subset or records, name, "bench", args.batch_size)

        # Warm-up: the model is loaded and the first-call kernels are built before any timing.
        warm_up = register("warm-up", records[: args.batch_size]).run_id
        score_serial(sessions, warm_up, settings, provider)

        for label, score in (("serial", score_serial), ("in-process", score_overlapping)):
            run_id = register(label).run_id
            cpu, start = time.process_time(), time.perf_counter()
            timings = score(sessions, run_id, settings, provider)
            wall = time.perf_counter() - start
            timings["cpu_s"] = time.process_time() - cpu
            results.append((label, wall, timings))
        if not args.no_op_model:
            worker_runs = [("1-prefork", 1, "prefork")] + [
                (f"{n}-default", n, None) for n in args.workers
            ]
            for name, workers, pool in worker_runs:
                warm_ups = [
                    register(f"warm-up {name} {i}", records[: args.batch_size])
                    for i in range(workers)
                ]
                wall, split, start_up = score_on_workers(
                    tmp, env, settings, sessions, register(name), warm_ups, pool
                )
                results.append((name, wall, split))
                start_ups.append(f"{name}: {start_up}")
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
    model_name = "no-op model (feed ceiling)" if args.no_op_model else config.backbone
    print(
        f"\n{args.images} images of {args.image_size} px, batches of {args.batch_size}, "
        f"pipeline depth {settings.pipeline_depth}, {model_name}, {cores} CPU cores, "
        f"{env['PATCHQ_DATABASE_URL'].split(':')[0]}"
    )
    header = f"{'path':<12}{'images/s':>9}{'wall s':>8}" + "".join(f"{k:>12}" for k in TIMING_KEYS)
    header += f"{'overlap':>9}{'img/CPU-s':>10}"
    print(header + "\n" + "-" * len(header))
    for label, wall, split in results:
        row = f"{label:<12}{args.images / wall:>9.1f}{wall:>8.1f}"
        row += "".join(f"{split[k]:>12.1f}" for k in TIMING_KEYS)
        row += f"{sum(split[k] for k in TIMING_KEYS) / wall:>9.2f}"
        row += f"{args.images / split['cpu_s']:>10.1f}" if "cpu_s" in split else f"{'':>10}"
        print(row.rstrip())
    print(
        "(time split: seconds summed over batches and worker processes; overlap: their sum / "
        "wall; img/CPU-s: images per CPU-second of the scoring processes = images/s per core)"
    )
    for line in start_ups:
        print(line)


def fit_and_store(
    root: Path,
    sessions: sessionmaker[Session],
    config: PatchCoreConfig,
    n_test: int,
    device: str,
) -> tuple[PatchCore, list[ImageRecord]]:
    """Fit category "tex" on 30 synthetic textures and store it; (model, its test images)."""
    make_seed_layout(root, "tex", n_good=30, n_bad=4, n_test=n_test, size=config.image_size)
    print(f"fitting {config.backbone} on 30 synthetic {config.image_size} px images", flush=True)
    model = fit_category(discover(root), config, device=device, progress=False).model
    data = save_artifact(model, "tex")
    with sessions.begin() as session:
        store_model(session, "tex", data, artifact_hash(data), config.backbone, {}, None, 1)
    return model, find_images(root, ["tex"], "test")


def score_on_workers(
    tmp: Path,
    env: dict[str, str],
    settings: Settings,
    sessions: sessionmaker[Session],
    submission: Submission,
    warm_ups: list[Submission],
    pool: str | None,
) -> tuple[float, dict[str, float], str]:
    """Start one patchq worker process per warm-up run (Celery `pool`; None: the default),
    score each warm-up run on its own worker, then time the run on all of them;
    (wall s, time split of the timed run, start-up times)."""
    threads = str(max(1, (os.cpu_count() or 1) // len(warm_ups)))
    name = pool or "default"
    logs = [tmp / f"{name}{len(warm_ups)}-{i}.log" for i in range(len(warm_ups))]
    app = broker_app(settings)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        spawned = time.perf_counter()
        for i, log in enumerate(logs):
            with log.open("wb") as output:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            *("-m", "producer.cli", "worker", f"--hostname=b{i}@%h"),
                            f"--queues={settings.queue},{settings.queue}-warm{i}",
                            *([f"--pool={pool}"] if pool else []),
                        ],
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
        ready = time.perf_counter()
        for i, warm_up in enumerate(warm_ups):
            queue = f"{settings.queue}-warm{i}"
            enqueue_pending(app, sessions, warm_up.run_id, settings.batch_size, queue)
        _wait(lambda: all(_finished(sessions, w.run_id) for w in warm_ups), START_TIMEOUT_S)
        warm = time.perf_counter()
        offsets = [len(log.read_text()) for log in logs]  # the timed run's log lines follow
        groups = {process.pid for process in processes}  # each worker's own process group
        cpu = _cpu_seconds(groups)
        enqueue_pending(app, sessions, submission.run_id, settings.batch_size, settings.queue)
        _wait(lambda: _finished(sessions, submission.run_id), RUN_TIMEOUT_S, poll_s=0.2)
        wall = time.perf_counter() - warm
        cpu = _cpu_seconds(groups) - cpu
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    split = dict.fromkeys(TIMING_KEYS, 0.0) | {"cpu_s": cpu}
    for log, offset in zip(logs, offsets, strict=True):
        for key, value in TIMING_LINE.findall(log.read_text()[offset:]):
            if key in split:
                split[key] += float(value)
    start_up = f"ready {ready - spawned:.1f} s after start, warm-up batch {warm - ready:.1f} s"
    return wall, split, start_up


def _cpu_seconds(process_groups: set[int]) -> float:
    """CPU seconds (user + system) the live processes of `process_groups` used so far (Linux
    /proc; a worker is a supervisor and its scoring child, in a process group of their own)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) in process_groups:  # fields: state, ppid, pgrp, ..., utime, stime
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _finished(sessions: sessionmaker[Session], run_id: int) -> bool:
    with sessions() as session:
        return sum(r.pending for r in run_progress(session, run_id)) == 0


def _wait(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s")
        time.sleep(poll_s)


if __name__ == "__main__":
    main()
