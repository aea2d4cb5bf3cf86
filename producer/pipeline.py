"""The producer's steps, shared by `submit`, `status`, `run` and `demo`.

find images -> register them in a run (with each category's latest model) -> either enqueue
batches of image ids for Celery workers, or score the same batches in this process with the
same function the workers run -> follow progress in the database -> aggregate.

The database is the only place progress is read from: a queue can be lost (a Redis restart
without persistence) and refilled with `patchq submit` for the same run, which enqueues only
the images that are still pending.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from common.database import (
    CategoryProgress,
    ImageRow,
    create_run,
    latest_model_id,
    open_database,
    pending_image_ids,
    register_images,
    retry_failed,
    run_id_by_name,
    run_progress,
)
from common.errors import PatchqError
from common.layouts import (
    ImageRecord,
    LayoutError,
    discover,
    discover_archive,
    list_categories,
    summarize,
)
from common.patchcore import PatchCoreConfig
from common.schema import Image, Model
from common.scoring import TIMING_KEYS, ModelProvider, score_batch
from common.settings import Settings, mask_url
from producer.fit_command import fit_and_store

if TYPE_CHECKING:
    from celery import Celery

SPLITS = ("test", "train", "all")
BROKER_CHECK_TIMEOUT_S = 3.0
POLL_S = 1.0


class SubmitError(PatchqError):
    """A run cannot be submitted as asked; the message names what is missing and the fix."""


class BrokerError(PatchqError):
    """The broker cannot be reached or is not configured."""


@dataclass(frozen=True)
class Submission:
    run_id: int
    run_name: str
    added: int  # images new to the run
    pending: int  # images of the run still to score
    retried: int = 0  # failed images put back to pending


def find_images(
    source: Path, categories: Sequence[str] | None, split: str = "test"
) -> list[ImageRecord]:
    """Images to score: a data root's `split` images, or every image of a folder tree/manifest.

    A folder counts as a data root when it holds <category>/train/good folders; then
    `categories` picks among them (default: all). A plain folder or manifest needs exactly one
    category, the model its images are scored with.
    """
    if source.is_dir() and list_categories(source):
        records = discover(source, categories or None)
        chosen = [r for r in records if split == "all" or r.split == split]
        if not chosen:
            names = ", ".join(sorted({r.category for r in records}))
            raise SubmitError(
                f"{source}: no {split} images for {names}; add images there "
                "or pick another --split (test, train, all)"
            )
        return chosen
    if not categories or len(categories) != 1:
        raise SubmitError(
            f"{source} is a folder tree or manifest, not a data root; give the category whose "
            "model scores it with exactly one --category"
        )
    if not source.exists():
        raise LayoutError(
            f"{source}: not found; give a data root, a folder of images or a manifest"
        )
    return discover_archive(source, categories[0])


def latest_models(session: Session, categories: Sequence[str]) -> dict[str, int]:
    """Each category's newest model id; a category without one is a one-line error."""
    found = {category: latest_model_id(session, category) for category in categories}
    missing = sorted(category for category, model_id in found.items() if model_id is None)
    if missing:
        known = sorted(set(session.scalars(select(Model.category).distinct())))
        raise SubmitError(
            f"no model for category {', '.join(missing)} (models exist for: "
            f"{', '.join(known) or 'none'}); run `patchq fit --data ROOT --category "
            f"{missing[0]}` first"
        )
    return {category: model_id for category, model_id in found.items() if model_id is not None}


def default_run_name() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


def register_run(
    sessions: sessionmaker[Session],
    records: Sequence[ImageRecord],
    run_name: str | None,
    source: str,
    batch_size: int,
    retry: bool = False,
) -> Submission:
    """Create the run (or continue the one of that name) and register its images; with
    ``retry``, its failed images are put back to pending first."""
    name = run_name or default_run_name()
    with sessions.begin() as session:
        model_ids = latest_models(session, sorted({r.category for r in records}))
        run_id = run_id_by_name(session, name) or create_run(session, name, source, batch_size)
        rows = [_image_row(record, model_ids[record.category]) for record in records]
        added = register_images(session, run_id, rows)
        retried = retry_failed(session, run_id) if retry else 0
        pending = len(pending_image_ids(session, run_id))
    return Submission(run_id, name, added, pending, retried)


def _image_row(record: ImageRecord, model_id: int) -> ImageRow:
    return ImageRow(
        category=record.category,
        path=str(record.path.absolute()),  # workers may run elsewhere, in another folder
        model_id=model_id,
        split=record.split,
        label=record.label,
        defect_type=record.defect_type,
        mask_path=None if record.mask_path is None else str(record.mask_path.absolute()),
    )


def broker_app(settings: Settings) -> Celery:
    """The Celery app (as the workers build it) after checking the broker answers."""
    from worker.config import make_app  # imported here: in-process runs never need Celery

    app = make_app(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_CHECK_TIMEOUT_S)
    except Exception as error:  # kombu wraps every transport's own connection errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BrokerError(
            f"cannot reach the broker at {mask_url(settings.broker_url or '')}: {reason}; "
            "start Redis there or fix PATCHQ_BROKER_URL"
        ) from None
    return app


def enqueue_pending(
    app: Celery, sessions: sessionmaker[Session], run_id: int, batch_size: int, queue: str
) -> int:
    """Send the run's pending images as batches of ids; returns the number of batches."""
    from worker.config import TASK_NAME

    with sessions() as session:
        ids = pending_image_ids(session, run_id)
    batches = [ids[start : start + batch_size] for start in range(0, len(ids), batch_size)]
    with app.producer_or_acquire() as producer:
        for batch in batches:
            app.send_task(
                TASK_NAME,
                args=[run_id, batch],
                queue=queue,
                producer=producer,
                retry=True,
                retry_policy={"max_retries": 3, "interval_start": 0.5, "interval_max": 2},
            )
    return len(batches)


def score_in_process(
    sessions: sessionmaker[Session],
    run_id: int,
    settings: Settings,
    progress: bool = True,
) -> dict[str, float]:
    """Score the run's pending images here, batch by batch; returns summed timings (s)."""
    with sessions() as session:
        ids = pending_image_ids(session, run_id)
    provider = ModelProvider(sessions, settings.model_cache_dir, settings.device)
    worker = f"inprocess@{socket.gethostname()}/{os.getpid()}"
    totals = dict.fromkeys(TIMING_KEYS, 0.0)
    with tqdm(total=len(ids), desc="scoring", unit="img", disable=not progress) as bar:
        for start in range(0, len(ids), settings.batch_size):
            batch = ids[start : start + settings.batch_size]
            outcome = score_batch(
                sessions, run_id, batch, provider, worker, settings.max_redeliveries + 1
            )
            for key, seconds in outcome.timings.items():
                totals[key] += seconds
            bar.update(len(batch))
            if outcome.failed:
                bar.set_postfix(failed=len(outcome.failed))
    return totals


def wait_for_run(
    sessions: sessionmaker[Session],
    run_id: int,
    timeout_s: float | None = None,
    progress: bool = True,
) -> list[CategoryProgress]:
    """Follow the run in the database until nothing is pending (or `timeout_s` passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with sessions() as session:
        rows = run_progress(session, run_id)
    total = sum(row.total for row in rows)
    with tqdm(total=total, desc="scoring", unit="img", disable=not progress) as bar:
        while True:
            finished = sum(row.done + row.failed for row in rows)
            bar.update(finished - bar.n)
            bar.set_postfix(failed=sum(row.failed for row in rows))
            if finished == total:
                return rows
            if deadline is not None and time.monotonic() > deadline:
                raise SubmitError(
                    f"run {run_id} still has {total - finished} pending images after "
                    f"{timeout_s:.0f} s; check that workers are running (`patchq worker`)"
                )
            time.sleep(POLL_S)
            with sessions() as session:
                rows = run_progress(session, run_id)


def failure_examples(session: Session, run_id: int, limit: int = 3) -> list[tuple[str, str]]:
    """A few (path, reason) of the run's failed images, to print next to the counts."""
    rows = session.execute(
        select(Image.path, Image.error)
        .where(Image.run_id == run_id, Image.status == "failed")
        .order_by(Image.id)
        .limit(limit)
    )
    return [(path, error or "") for path, error in rows]


@dataclass(frozen=True)
class FitOptions:
    """How to fit categories that have no model yet (or all of them, with refit)."""

    config: PatchCoreConfig
    holdout: float
    refit: bool = False


@dataclass(frozen=True)
class PipelineResult:
    run_id: int
    run_name: str
    model_ids: dict[str, int]
    progress: list[CategoryProgress]
    timings: dict[str, float]  # in-process only: where the scoring time went


def run_pipeline(
    data: Path,
    categories: Sequence[str] | None,
    settings: Settings,
    fit_options: FitOptions,
    run_name: str | None = None,
    split: str = "all",
    policy: str | None = None,
    out_dir: Path | None = None,
) -> PipelineResult:
    """fit (categories without a model) -> submit -> score -> aggregate, on `settings`.

    Without a broker the batches are scored in this process; with one they are enqueued
    for `patchq worker` processes and this waits, following progress in the database.
    """
    with open_database(settings.database_url) as (engine, sessions):
        records = discover(data, categories or None)
        print(summarize(records))
        app = broker_app(settings) if settings.broker_url else None
        model_ids = _ensure_models(sessions, records, settings, fit_options)
        with sessions() as session:
            print(held_out_table(session, model_ids))
        submission = register_run(
            sessions, find_images(data, categories, split), run_name, str(data), settings.batch_size
        )
        print(f"run {submission.run_name} (id {submission.run_id}): {submission.pending} to score")
        timings = _score(app, sessions, submission, settings)
        with sessions() as session:
            progress = run_progress(session, submission.run_id)
            print(describe_progress(progress, failure_examples(session, submission.run_id)))
        aggregate(engine, submission.run_id, policy, out_dir)
    return PipelineResult(submission.run_id, submission.run_name, model_ids, progress, timings)


def _score(
    app: Celery | None,
    sessions: sessionmaker[Session],
    submission: Submission,
    settings: Settings,
) -> dict[str, float]:
    """Score the run in this process (no broker) or wait for the workers; in-process timings."""
    if app is None:
        return score_in_process(sessions, submission.run_id, settings)
    batches = enqueue_pending(app, sessions, submission.run_id, settings.batch_size, settings.queue)
    print(
        f"{batches} batches on queue {settings.queue!r}; waiting for `patchq worker` "
        f"processes (Ctrl-C stops waiting, not the run: `patchq status {submission.run_name}`)"
    )
    wait_for_run(sessions, submission.run_id)
    return dict.fromkeys(TIMING_KEYS, 0.0)


def _ensure_models(
    sessions: sessionmaker[Session],
    records: Sequence[ImageRecord],
    settings: Settings,
    options: FitOptions,
) -> dict[str, int]:
    categories = sorted({r.category for r in records})
    with sessions() as session:
        existing = {c: latest_model_id(session, c) for c in categories}
    to_fit = [c for c in categories if options.refit or existing[c] is None]
    for category in sorted(set(categories) - set(to_fit)):
        print(f"{category}: using model {existing[category]} (fit again with --refit)")
    fitted = {}
    if to_fit:
        fitted = fit_and_store(
            [r for r in records if r.category in to_fit],
            options.config,
            settings,
            options.holdout,
        )
    return {c: fitted.get(c) or existing[c] for c in categories}  # type: ignore[misc]


def describe_progress(
    rows: Sequence[CategoryProgress], failures: Sequence[tuple[str, str]] = ()
) -> str:
    """Per category: done / failed / pending, then a few failure reasons."""
    lines = [
        f"{row.category}: {row.done} done, {row.failed} failed, {row.pending} pending"
        for row in rows
    ]
    lines += [f"  failed: {reason}" for _, reason in failures]
    return "\n".join(lines)


def aggregate(engine: Engine, run_id: int, policy: str | None, out_dir: Path | None) -> Path:
    """Thresholds, predictions, metrics and the HTML report of the run; returns the report."""
    from aggregator.aggregate import aggregate_run  # matplotlib & co. only when needed
    from aggregator.report import render_report

    report = render_report(engine, aggregate_run(engine, run_id, policy, out_dir))
    print(f"report: {report}")
    return report


def held_out_table(session: Session, model_ids: dict[str, int]) -> str:
    """Each category's validation figures as stored with its model by `fit`."""
    lines = ["held-out validation (images not in the memory bank):"]
    for category, model_id in sorted(model_ids.items()):
        validation = session.scalar(select(Model.validation).where(Model.id == model_id)) or {}
        lines.append(
            f"  {category}: AUROC {_fmt(validation.get('auroc'))}  "
            f"AP {_fmt(validation.get('average_precision'))}  "
            f"({validation.get('n_normal', 0)} normal, {validation.get('n_anomalous', 0)} "
            f"defective; model {model_id})"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
