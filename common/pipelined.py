"""Keep the backbone busy: overlap the stages of consecutive batches in one process.

`score_batch` runs claim -> decode -> backbone and search -> write one after the other, so the
device idles through every decode and every SQL write. A `PipelinedScorer` runs the same stage
functions (common.scoring.stages) from several threads, one batch per thread, and lets only one
batch at a time onto the backbone and the index (which use every core, or the GPU, on their own).
While batch n is there, batch n+1 is claimed and decoded (PIL releases the GIL) and batch n-1
is written (the database driver waits on I/O without the GIL).

Each call still returns only once its own rows are committed. That is what keeps results
exactly once with acks late: a Celery task (one per thread of the worker's `threads` pool) is
acknowledged after its write, never before, so a worker that dies holds at most `depth`
unacknowledged batches, all redelivered, and the idempotent upserts keyed by (run, image) make
any repeat harmless. The price is one thread, one database session and one decoded batch per
pipeline slot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

from common.scoring.batch import score_batch
from common.scoring.context import ScoringContext
from common.scoring.stages import BatchOutcome


@dataclass(frozen=True)
class InFlight:
    """A batch being scored and since when (time.monotonic())."""

    run_id: int
    image_ids: tuple[int, ...]
    since: float


class PipelinedScorer:
    """Scores batches from any number of threads, one at a time on the backbone and index.

    The threads share one lease holder (the worker node), and a lease lets its holder claim
    again, so two deliveries of one image to two threads would both score it. Each thread
    therefore leaves out the images another thread of this scorer holds: they are reported
    skipped, and the thread that holds them writes them once. A batch a worker was lost on
    is scored image by image with no other batch in flight (common.scoring.isolation), so a
    poison image's crashes count against it alone, as with one batch at a time.
    """

    def __init__(self, context: ScoringContext) -> None:
        # The device lock is the scorer's own: it is what keeps one batch at a time there.
        self._context = replace(context, device=threading.Lock())
        self._guard = threading.Lock()
        self._in_flight: dict[int, InFlight] = {}

    def score(self, run_id: int, image_ids: Sequence[int]) -> BatchOutcome:
        """What `score_batch` does for one batch, overlapping with other threads' batches."""
        key = threading.get_ident()
        with self._guard:
            busy = {i for batch in self._in_flight.values() for i in batch.image_ids}
            mine = tuple(i for i in image_ids if i not in busy)
            self._in_flight[key] = InFlight(run_id, mine, time.monotonic())
        try:
            outcome = score_batch(self._context, run_id, mine)
        finally:
            with self._guard:
                del self._in_flight[key]
        outcome.skipped = sorted({*outcome.skipped, *(set(image_ids) - set(mine))})
        return outcome

    def in_flight(self) -> list[InFlight]:
        """The batches being scored now, one per thread (for the heartbeat and the watchdog)."""
        with self._guard:
            return list(self._in_flight.values())

    def overdue(self, limit_s: float) -> list[InFlight]:
        """Batches in flight for longer than `limit_s` seconds (for a worker's watchdog)."""
        now = time.monotonic()
        return [batch for batch in self.in_flight() if now - batch.since > limit_s]


def score_pipelined(
    scorer: PipelinedScorer, run_id: int, batches: Sequence[Sequence[int]], depth: int
) -> Iterator[tuple[Sequence[int], BatchOutcome]]:
    """Score `batches` with `depth` of them in flight; yields (batch, outcome) as each ends.

    At most `depth` batches are claimed, decoded or unwritten at any moment, so memory stays
    bounded whatever the number of batches.
    """
    with ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="pipeline") as pool:
        outcomes = pool.map(lambda ids: scorer.score(run_id, ids), batches)
        yield from zip(batches, outcomes, strict=True)
