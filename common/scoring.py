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

Models come from a `ModelProvider`: fetched from the database once per process, kept on disk
by content hash and built lazily in the process that scores, never in a parent that forks.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from common.data.batches import DecodedBatch, decode_batch
from common.engine.artifact import artifact_hash
from common.engine.ensemble import Ensemble, load_model
from common.engine.memory_bank import MemoryBank
from common.engine.patchcore import PatchCore
from common.store.database import (
    ScoreRow,
    load_model_bytes,
    mark_failed,
    model_content_hash,
    upsert_scores,
)
from common.store.leases import Lease, claim_batch
from common.store.schema import Image

DEFAULT_CACHED_MODELS = 3
# Decoding threads per batch: one per core, so the feed of one worker grows with the host's
# cores (PIL releases the GIL; at 224 px a core decodes ~300 images/s, see docs/performance.md).
DECODE_THREADS = os.cpu_count() or 4
log = logging.getLogger(__name__)
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


class ModelProvider:
    """Ready-to-score models by id: an LRU of a few in memory, artifacts cached on disk.

    A worker that scores several categories keeps the last `capacity` models built; the
    artifact bytes are read from the database only when the disk cache lacks them (checked by
    content hash, so a truncated cache file is fetched again). Threads of one process share
    it safely. The provider belongs to the process that created it: after a fork it drops
    what it holds rather than share CUDA or FAISS state with its parent.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        cache_dir: Path,
        device: str = "auto",
        capacity: int = DEFAULT_CACHED_MODELS,
    ) -> None:
        self._sessions = session_factory
        self._cache_dir = Path(cache_dir)
        self._device = device
        self._capacity = max(1, capacity)
        self._models: OrderedDict[int, PatchCore | Ensemble] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a pipelined worker asks from several threads

    def get(self, model_id: int) -> PatchCore | Ensemble:
        """The model, built on first use in this process (once, whichever thread asks)."""
        with self._lock:
            return self._get(model_id)

    def _get(self, model_id: int) -> PatchCore | Ensemble:
        if os.getpid() != self._pid:
            self._models.clear()
            self._pid = os.getpid()
        model = self._models.get(model_id)
        if model is None:
            model = load_model(self._artifact_bytes(model_id), self._device)
            self._models[model_id] = model
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
        self._models.move_to_end(model_id)
        return model

    def _artifact_bytes(self, model_id: int) -> bytes:
        with self._sessions() as session:
            content_hash = model_content_hash(session, model_id)
            cached = self._cache_dir / f"{content_hash}.npz"
            if cached.is_file():
                data = cached.read_bytes()
                if artifact_hash(data) == content_hash:
                    return data
            data, content_hash = load_model_bytes(session, model_id)
        self._write_cache(self._cache_dir / f"{content_hash}.npz", data)
        return data

    @staticmethod
    def _write_cache(path: Path, data: bytes) -> None:
        """Write via a temporary file and rename, so concurrent workers never read half a file.

        The cache only saves database reads: a folder that cannot be written is logged, and
        scoring goes on with the bytes already in memory.
        """
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as f:
                tmp = Path(f.name)
                f.write(data)
            os.replace(tmp, path)
        except OSError as error:
            log.warning("model cache %s not written (%s); set PATCHQ_MODEL_CACHE_DIR", path, error)
            if tmp is not None:
                tmp.unlink(missing_ok=True)


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


class Isolation:
    """Lets a batch a worker was lost on be scored with nothing else in flight in its process.

    Batches are scored `shared` (several threads of a pipelined scorer at once); the images
    of a batch a worker was lost on are scored `alone`, one by one, each once every batch in
    flight has been written and before another is claimed. A process that then dies was
    killed by that image, and only that image's claim count goes up: batchmates and the
    other threads' batches are never counted toward the limit for a poison image's crashes.
    Waiting `alone` calls go before new `shared` ones.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._waiting_alone = 0
        self._alone = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting_alone += 1
            self._changed.wait_for(lambda: not self._alone and not self._sharing)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


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


@dataclass(frozen=True)
class DecodedGroup:
    """Images of a batch that share a model, decoded and ready for the backbone."""

    model: PatchCore | Ensemble
    images: list[Image]
    decoded: DecodedBatch


def claim_images(
    session_factory: sessionmaker[Session],
    run_id: int,
    image_ids: Sequence[int],
    max_deliveries: int | None,
    lease: Lease,
    outcome: BatchOutcome,
) -> list[Image] | None:
    """Lease and count the images still to score, committed before scoring, so a worker
    killed while scoring still leaves its count and its (soon expiring) lease behind.
    None, claiming nothing, for a batch a worker was lost on (common.store.leases)."""
    start = time.perf_counter()
    with session_factory.begin() as session:
        claimed = claim_batch(session, image_ids, lease)
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
    images: list[Image],
    model_provider: ModelProvider,
    outcome: BatchOutcome,
    pin_memory: bool = False,
) -> list[DecodedGroup]:
    """Group images by model and decode each group; unreadable files go to `outcome.failed`.

    `pin_memory`: put the batch in page-locked memory, so its copy to a GPU can be
    asynchronous (pointless on CPU).
    """
    by_model: dict[int, list[Image]] = defaultdict(list)
    for image in images:
        by_model[image.model_id].append(image)
    groups = []
    for model_id, group in by_model.items():
        model = _timed(outcome, "model_s", lambda m=model_id: model_provider.get(m))
        decoded = _timed(
            outcome,
            "decode_s",
            lambda m=model, g=group: decode_batch(
                [Path(i.path) for i in g], m.preprocessing, DECODE_THREADS
            ),
        )
        outcome.failed |= {group[index].id: reason for index, reason in decoded.failures.items()}
        if decoded.ok:
            if pin_memory:
                decoded = replace(decoded, tensor=decoded.tensor.pin_memory())
            groups.append(DecodedGroup(model, group, decoded))
    return groups


def infer_groups(
    groups: list[DecodedGroup], run_id: int, worker_name: str, outcome: BatchOutcome
) -> list[ScoreRow]:
    """Backbone and nearest-neighbour search of decoded groups: their score rows."""
    return [row for group in groups for row in _score_group(group, run_id, worker_name, outcome)]


def write_batch(
    session_factory: sessionmaker[Session],
    run_id: int,
    rows: list[ScoreRow],
    outcome: BatchOutcome,
) -> None:
    """One transaction: every score row of the batch and its failures, as idempotent upserts."""
    start = time.perf_counter()
    if rows or outcome.failed:
        with session_factory.begin() as session:
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
