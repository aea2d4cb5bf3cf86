"""The stages of scoring one batch, separate so that common.pipelined can overlap them.

claim_images -> decode_groups -> infer_groups -> write_batch: a short transaction that leases
and counts the claim, decoding and the model outside any transaction, then one transaction
that writes every row of the batch as idempotent upserts. Each stage adds its time to the
batch's `BatchOutcome`.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

import numpy as np

from common.data.batches import DecodedBatch, decode_batch
from common.data.locations import to_location
from common.engine.ensemble import Ensemble
from common.engine.memory_bank import MemoryBank
from common.engine.patchcore import PatchCore
from common.scoring.context import ScoringContext
from common.store.image_rows import mark_failed
from common.store.leases import Lease, claim_batch, unclaim
from common.store.schema import Image
from common.store.score_rows import ScoreRow, upsert_scores

# Decoding threads per batch: one per core, so the feed of one worker grows with the host's
# cores (PIL releases the GIL; at 224 px a core decodes ~300 images/s, see docs/performance.md).
DECODE_THREADS = os.cpu_count() or 4
_T = TypeVar("_T")
TIMING_KEYS = ("model_s", "decode_s", "backbone_s", "search_s", "write_s")


@dataclass
class BatchOutcome:
    """What one call did; the timings (seconds) split where a batch's time goes."""

    done: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)  # already done/failed, or not in the run
    timings: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMING_KEYS, 0.0))

    def add(self, other: BatchOutcome) -> None:
        """Fold in the outcome of part of the batch."""
        self.done += other.done
        self.failed |= other.failed
        self.skipped += other.skipped
        for key, seconds in other.timings.items():
            self.timings[key] += seconds


class _TimedBank:
    """A memory bank that adds up the time spent searching, to split backbone from search."""

    def __init__(self, bank: MemoryBank) -> None:
        self._bank = bank
        self.seconds = 0.0

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        with self._timing():
            return self._bank.search(queries, k)

    def search_near(
        self, queries: np.ndarray, cells: np.ndarray, radius: int
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._timing():
            return self._bank.search_near(queries, cells, radius)

    @contextmanager
    def _timing(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name: str) -> object:
        return getattr(self._bank, name)


@dataclass(frozen=True)
class DecodedGroup:
    """Images of a batch that share a model, decoded and ready for the backbone."""

    model: PatchCore | Ensemble
    images: list[Image]
    decoded: DecodedBatch


def claim_images(
    context: ScoringContext, run_id: int, image_ids: Sequence[int], outcome: BatchOutcome
) -> list[Image] | None:
    """Lease and count the images still to score, committed before scoring, so a worker
    killed while scoring still leaves its count and its (soon expiring) lease behind.
    None, claiming nothing, for a batch a worker was lost on (common.store.leases)."""
    start = time.perf_counter()
    max_deliveries = context.max_deliveries
    with context.sessions.begin() as session:
        claimed = claim_batch(session, image_ids, context.lease or Lease(context.worker))
        if claimed.lost_on:
            return None
        pending = [i for i in claimed.images if i.id in claimed.attempts and i.run_id == run_id]
        worn_out = {
            i.id: f"worker lost {claimed.attempts[i.id] - 1} times while scoring it; "
            "see the worker logs"
            for i in pending
            if max_deliveries is not None and claimed.attempts[i.id] > max_deliveries
        }
        mark_failed(session, run_id, worn_out)
    outcome.timings["write_s"] += time.perf_counter() - start
    outcome.failed |= worn_out
    outcome.skipped = sorted(set(image_ids) - {i.id for i in pending})
    return [i for i in pending if i.id not in worn_out]


def decode_groups(
    context: ScoringContext, images: list[Image], outcome: BatchOutcome
) -> list[DecodedGroup]:
    """Group images by model and decode each group; unreadable files go to `outcome.failed`."""
    by_model: dict[int, list[Image]] = defaultdict(list)
    for image in images:
        by_model[image.model_id].append(image)
    groups = []
    for model_id, group in by_model.items():
        model = _timed(outcome, "model_s", lambda m=model_id: context.models.get(m))
        decoded = _timed(
            outcome,
            "decode_s",
            lambda m=model, g=group: decode_batch(
                [to_location(i.path) for i in g], m.preprocessing, DECODE_THREADS
            ),
        )
        outcome.failed |= {group[index].id: reason for index, reason in decoded.failures.items()}
        if decoded.ok:
            if context.pin_memory:
                decoded = replace(decoded, tensor=decoded.tensor.pin_memory())
            groups.append(DecodedGroup(model, group, decoded))
    return groups


def give_back(context: ScoringContext, images: list[Image]) -> None:
    """Undo the claim of images that could not be fetched because the object store was down:
    their leases go and their claim is not counted, so an outage never wears out an image's
    redelivery limit, and whoever scores them next (this worker later, or another) may."""
    with context.sessions.begin() as session:
        unclaim(session, [image.id for image in images], context.lease or Lease(context.worker))


def infer_groups(
    context: ScoringContext, run_id: int, groups: list[DecodedGroup], outcome: BatchOutcome
) -> list[ScoreRow]:
    """Backbone and nearest-neighbour search of decoded groups: their score rows."""
    return [row for group in groups for row in _score_group(group, run_id, context.worker, outcome)]


def write_batch(
    context: ScoringContext, run_id: int, rows: list[ScoreRow], outcome: BatchOutcome
) -> None:
    """One transaction: every score row of the batch and its failures, as idempotent upserts."""
    start = time.perf_counter()
    if rows or outcome.failed:
        with context.sessions.begin() as session:
            upsert_scores(session, rows)
            mark_failed(session, run_id, outcome.failed)
    outcome.timings["write_s"] += time.perf_counter() - start
    outcome.done = [row["image_id"] for row in rows]


def _score_group(
    group: DecodedGroup, run_id: int, worker_name: str, outcome: BatchOutcome
) -> list[ScoreRow]:
    banks: list[_TimedBank] = []

    def timed(bank: MemoryBank) -> MemoryBank:
        banks.append(_TimedBank(bank))
        return banks[-1]  # type: ignore[return-value]

    timed_model = group.model.with_banks(timed)
    start = time.perf_counter()
    result = timed_model.score_tensors(group.decoded.tensor)
    elapsed = time.perf_counter() - start
    search = sum(bank.seconds for bank in banks)
    outcome.timings["search_s"] += search
    outcome.timings["backbone_s"] += elapsed - search
    per_image_ms = 1000 * elapsed / len(group.decoded.ok)
    return [
        ScoreRow(
            run_id=run_id,
            image_id=group.images[index].id,
            score=float(result.image_scores[row]),
            patch_map=result.patch_maps[row],
            embedding=result.embeddings[row],
            worker=worker_name,
            duration_ms=per_image_ms,
        )
        for row, index in enumerate(group.decoded.ok)
    ]


def _timed(outcome: BatchOutcome, key: str, work: Callable[[], _T]) -> _T:
    start = time.perf_counter()
    try:
        return work()
    finally:
        outcome.timings[key] += time.perf_counter() - start
