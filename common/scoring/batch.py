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

Models come from a `ModelProvider` (common.scoring.model_cache).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

from sqlalchemy.orm import Session, sessionmaker

from common.scoring.isolation import Isolation
from common.scoring.model_cache import ModelProvider
from common.scoring.stages import (
    BatchOutcome,
    claim_images,
    decode_groups,
    infer_groups,
    write_batch,
)
from common.store.leases import Lease


def score_batch(
    session_factory: sessionmaker[Session],
    run_id: int,
    image_ids: Sequence[int],
    model_provider: ModelProvider,
    worker_name: str,
    max_deliveries: int | None = None,
    lease: Lease | None = None,
    device: AbstractContextManager[object] | None = None,
    pin_memory: bool = False,
    isolation: Isolation | None = None,
) -> BatchOutcome:
    """Score the pending images of `image_ids` (of run `run_id`) and write the results.

    `max_deliveries`: an image claimed more often than this is marked failed instead of
    scored (None: no limit). `lease`: who claims the images (default: `worker_name`).
    `device`: held while the backbone and the index run, so that of several threads scoring
    batches at once (common.pipelined) one at a time is there while the others claim, decode
    and write; `isolation`: shared by those threads (see `Isolation`); `pin_memory`: see
    `decode_groups`. Unreadable images are marked failed with their reason; the rest of the
    batch is scored. A batch a worker was lost on is scored image by image (`_one_by_one`).
    """
    lease = lease or Lease(worker_name)
    isolation = isolation or Isolation()

    def score(ids: Sequence[int]) -> BatchOutcome | None:
        outcome = BatchOutcome()
        images = claim_images(session_factory, run_id, ids, max_deliveries, lease, outcome)
        if images is None:
            return None
        groups = decode_groups(images, model_provider, outcome, pin_memory)
        with device or nullcontext():
            rows = infer_groups(groups, run_id, worker_name, outcome)
        write_batch(session_factory, run_id, rows, outcome)
        return outcome

    with isolation.shared():
        outcome = score(image_ids)
    return _one_by_one(image_ids, score, isolation) if outcome is None else outcome


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
