"""Score one batch of a run's images: the task body that workers and the in-process path share.

The Celery task in worker/tasks.py is a thin wrapper around `score_batch`, so the distributed
and the embedded paths run exactly the same code and write exactly the same rows. Delivery is
at least once, so the function is written to be run again on the same batch:

1. one short transaction claims the batch's pending images (a lease, common.store.leases) and
   counts the claim (images.attempts); images already done, failed or held by another live
   worker are skipped, and images claimed more often than the redelivery limit allows are
   marked failed (a batch that keeps killing its worker must end). A batch a worker was lost
   on is retried image by image, so one poison image cannot take its batchmates down with it;
2. images are decoded and scored outside any transaction;
3. one transaction writes every score, patch map and embedding of the batch together with
   the decode failures, as idempotent upserts keyed by (run, image).

An object store that stays down through every retry (common.data.object_store) is no fault of
the images: their claim is given back and `ObjectStoreUnavailable` goes up to the caller, which
tries the batch again later (the Celery task retries with backoff).

What one scoring process shares between its batches (the database, the models, its name and
limits) comes in a `ScoringContext` (common.scoring.context).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from common.data.object_store import ObjectStoreUnavailable
from common.scoring.context import ScoringContext
from common.scoring.isolation import Isolation
from common.scoring.stages import (
    BatchOutcome,
    claim_images,
    decode_groups,
    give_back,
    infer_groups,
    write_batch,
)


def score_batch(context: ScoringContext, run_id: int, image_ids: Sequence[int]) -> BatchOutcome:
    """Score the pending images of `image_ids` (of run `run_id`) and write the results.

    Unreadable images are marked failed with their reason; the rest of the batch is scored.
    A batch a worker was lost on is scored image by image (`_one_by_one`).
    """

    def score(ids: Sequence[int]) -> BatchOutcome | None:
        outcome = BatchOutcome()
        images = claim_images(context, run_id, ids, outcome)
        if images is None:
            return None
        try:
            groups = decode_groups(context, images, outcome)
        except ObjectStoreUnavailable:
            give_back(context, images)
            raise
        with context.device:
            rows = infer_groups(context, run_id, groups, outcome)
        write_batch(context, run_id, rows, outcome)
        return outcome

    with context.isolation.shared():
        outcome = score(image_ids)
    return _one_by_one(image_ids, score, context.isolation) if outcome is None else outcome


def _one_by_one(
    image_ids: Sequence[int],
    score: Callable[[Sequence[int]], BatchOutcome | None],
    isolation: Isolation,
) -> BatchOutcome:
    """Score a batch a worker was lost on one image at a time, each claimed and written on its
    own and alone in the process: if one image kills the process again, the images before it
    are kept, and only that image's count goes up until the limit fails it."""
    outcome = BatchOutcome()
    for image_id in image_ids:
        with isolation.alone():
            outcome.add(score([image_id]) or BatchOutcome())  # one image is always claimed
    return outcome
