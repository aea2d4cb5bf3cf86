"""The in-process scoring paths the benches time, with a model provider the bench keeps.

A bench scores a warm-up run first and then its timed runs with one provider, so the model is
loaded and the first-call kernels are built before any timing; the feed-ceiling bench hands
in a provider of no-op models (bench.noop_model). `patchq run` (producer.pipeline) builds its
own provider for each run, so the benches put the same pieces together here.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.orm import Session, sessionmaker

from common.pipelined import PipelinedScorer, score_pipelined
from common.scoring.batch import score_batch
from common.scoring.context import ScoringContext
from common.scoring.model_cache import ModelProvider
from common.scoring.stages import TIMING_KEYS, BatchOutcome
from common.settings import Settings
from common.store.image_rows import pending_image_ids


def score_serial(
    sessions: sessionmaker[Session], run_id: int, settings: Settings, provider: ModelProvider
) -> dict[str, float]:
    """The run's batches one after the other with `score_batch` (no overlap): the baseline."""
    context = ScoringContext(sessions, provider, "serial", max_deliveries=2)
    batches = _batches(sessions, run_id, settings.batch_size)
    return _summed(score_batch(context, run_id, batch) for batch in batches)


def score_overlapping(
    sessions: sessionmaker[Session], run_id: int, settings: Settings, provider: ModelProvider
) -> dict[str, float]:
    """PATCHQ_PIPELINE_DEPTH batches overlapping, as `patchq run` without a broker and a
    worker score them (common.pipelined)."""
    context = ScoringContext(
        sessions,
        provider,
        "in-process",
        max_deliveries=settings.max_redeliveries + 1,
        pin_memory=settings.device.startswith("cuda"),
    )
    batches = _batches(sessions, run_id, settings.batch_size)
    scored = score_pipelined(PipelinedScorer(context), run_id, batches, settings.pipeline_depth)
    return _summed(outcome for _, outcome in scored)


def _batches(sessions: sessionmaker[Session], run_id: int, size: int) -> list[list[int]]:
    with sessions() as session:
        ids = pending_image_ids(session, run_id)
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def _summed(outcomes: Iterable[BatchOutcome]) -> dict[str, float]:
    """Each stage's seconds summed over batches (more than the wall time where they overlap)."""
    totals = dict.fromkeys(TIMING_KEYS, 0.0)
    for outcome in outcomes:
        for key, seconds in outcome.timings.items():
            totals[key] += seconds
    return totals
