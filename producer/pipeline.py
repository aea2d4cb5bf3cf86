"""`patchq run` and `patchq demo`: fit what has no model, submit, score, aggregate.

Without a broker the batches are scored in this process with the same function the workers run;
with one they are enqueued and this follows progress in the database, the only place progress is
read from.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from common.data.layouts import ImageRecord, discover, summarize
from common.data.locations import Location
from common.pipelined import PipelinedScorer, score_pipelined
from common.scoring.context import ScoringContext
from common.scoring.model_cache import ModelProvider
from common.scoring.stages import TIMING_KEYS
from common.settings import Settings
from common.store.connection import open_database
from common.store.image_rows import pending_image_ids
from common.store.model_rows import latest_model_id
from common.store.run_rows import CategoryProgress, run_progress
from common.store.schema import Model
from common.store.workers import process_name
from producer.answer_keys import AnswerKey
from producer.fitting import FitPlan, fit_and_store, held_out_figures
from producer.progress import describe_progress, failure_examples, wait_for_run
from producer.submission import Submission, enqueue_pending, find_images, register_run
from worker.broker_check import broker_app

if TYPE_CHECKING:
    from celery import Celery


def score_in_process(
    sessions: sessionmaker[Session],
    run_id: int,
    settings: Settings,
    progress: bool = True,
) -> dict[str, float]:
    """Score the run's pending images here, PATCHQ_PIPELINE_DEPTH batches overlapping (as in a
    worker); returns the timings (s) summed over batches, so they add up to more than the wall
    time when the stages overlap."""
    with sessions() as session:
        ids = pending_image_ids(session, run_id)
    context = ScoringContext(
        sessions,
        ModelProvider(sessions, settings.model_cache_dir, settings.device),
        process_name(f"inprocess@{socket.gethostname()}", os.getpid()),
        max_deliveries=settings.max_redeliveries + 1,
        pin_memory=settings.device.startswith("cuda"),
    )
    scorer = PipelinedScorer(context)
    batches = [
        ids[start : start + settings.batch_size]
        for start in range(0, len(ids), settings.batch_size)
    ]
    totals = dict.fromkeys(TIMING_KEYS, 0.0)
    with tqdm(total=len(ids), desc="scoring", unit="img", disable=not progress) as bar:
        for batch, outcome in score_pipelined(scorer, run_id, batches, settings.pipeline_depth):
            for key, seconds in outcome.timings.items():
                totals[key] += seconds
            bar.update(len(batch))
            if outcome.failed:
                bar.set_postfix(failed=len(outcome.failed))
    return totals


@dataclass(frozen=True)
class FitOptions:
    """How to fit categories that have no model yet (or all of them, with refit)."""

    plan: FitPlan
    refit: bool = False


@dataclass(frozen=True)
class PipelineResult:
    run_id: int
    run_name: str
    model_ids: dict[str, int]
    progress: list[CategoryProgress]
    timings: dict[str, float]  # in-process only: where the scoring time went


def run_pipeline(
    data: Location,
    categories: Sequence[str] | None,
    settings: Settings,
    fit_options: FitOptions,
    run_name: str | None = None,
    split: str = "all",
    policy: str | None = None,
    out_dir: Path | None = None,
    answer_keys: Sequence[Path] = (),
) -> PipelineResult:
    """fit (categories without a model) -> submit -> score -> [record answer keys] ->
    aggregate, on `settings`.

    Without a broker the batches are scored in this process; with one they are enqueued
    for `patchq worker` processes and this waits, following progress in the database.
    """
    keys = [AnswerKey.read(source) for source in answer_keys]  # a wrong file fails now
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
        for key in keys:
            key.record(sessions, submission.run_id)
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
        fitted = fit_and_store([r for r in records if r.category in to_fit], options.plan, settings)
    return {c: fitted.get(c) or existing[c] for c in categories}  # type: ignore[misc]


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
        note = f"; model {model_id}{_chosen(validation)}"
        lines.append(f"  {category}: {held_out_figures(validation, note)}")
    return "\n".join(lines)


def _chosen(validation: dict) -> str:
    """How --auto chose the model, when it did: with labels its figures are cross-fitted,
    each half scored by the choice made on the other; without, it has no figures to show."""
    auto = validation.get("auto")
    if not auto:
        return ""
    if auto.get("chosen_on") == "synthesised":
        return f", --auto: {auto['chosen']}, chosen without labels"
    return f", --auto: {auto['chosen']}, cross-fitted"
