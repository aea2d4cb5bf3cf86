"""Memory-bank reduction: approximate greedy k-center coreset and the seed's random cap.

PatchCore keeps only a subset of the training patches so that nearest-neighbour search stays
cheap; greedy k-center picks that subset so every training patch stays close to a kept one
(Roth et al. 2022, "Towards Total Recall in Industrial Anomaly Detection", Alg. 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from common.engine.memory_bank import as_float_matrix
from common.errors import PatchqError

# Candidate-set size for the lazy greedy step (see ApproximateGreedyCoresetSampler). Each step
# touches this many projected rows, which stay in cache; larger means fewer full passes.
_CANDIDATES = 2048
# Elements in the reusable (rows x pending centres) distance block of a full pass: 32 MB.
_BLOCK_ELEMENTS = 8 * 1024 * 1024
# Patches per chunk of a streamed fit (ChunkedSelection): fits of up to this many patches (167
# images of 784) get the greedy coreset of all their patches, as before; larger ones a coreset
# per chunk. Set from docs/performance.md's "Fit that scales with the images".
CHUNK_ROWS = 131_072


class CoresetError(PatchqError):
    """Bad coreset settings or features; the message names the value and the valid range."""


def _as_features(features: np.ndarray) -> np.ndarray:
    return as_float_matrix(features, "features", CoresetError)


class ApproximateGreedyCoresetSampler:
    """Greedy k-center coreset on a Johnson-Lindenstrauss random projection (PatchCore Alg. 1).

    The result is exactly what Alg. 1 picks on the projected features (ties aside); the
    projection (a seeded Gaussian matrix, skipped when D <= projection_dim) only makes each
    distance cheaper. The first centre is drawn at random from the seed.

    Plain Alg. 1 reads all N projected rows once per chosen centre: memory-bound, ~18 ms per step
    for 235k x 128 on this 2-core machine, ~7 minutes for a 10% coreset. This implementation
    evaluates the same greedy lazily instead. It keeps a (N,) vector of squared distances to the
    nearest chosen centre and a small candidate set: the _CANDIDATES points farthest from the
    centres at the last full pass, whose distances are updated in place after every pick. Every
    other point was at most T away at that pass and distances only shrink, so while the best
    candidate is at least T away it is the true farthest point and is picked without touching the
    other N rows. When it is not, one full pass folds all centres picked since the last pass into
    the (N,) vector as a blocked matrix product (compute-bound GEMM instead of one memory-bound
    matrix-vector product per centre) and a new candidate set is taken.

    Trade-off: memory O(N * d') for the projected float32 copy (d' = min(D, projection_dim);
    120 MB at 235k x 128) plus O(N) for the distance vector plus fixed 32 MB block and
    _CANDIDATES x d' buffers; no N x D temporary is ever allocated. Time O(k * N * d') as in
    Alg. 1, but as GEMM flops. Measured on the shared 2-core dev machine (AMD EPYC, 2 threads):
    235k x 272 random normal -> 10% (23.5k centres) in 14-16 s idle (28 s when other jobs ran),
    peak RSS +196 MB over the features (plain Alg. 1: ~420 s, from its per-step time). Run
    `PYTHONPATH=. .venv/bin/python bench/coreset_bench.py`.
    """

    def __init__(
        self, ratio: float = 0.1, projection_dim: int = 128, seed: int = 0, device: str = "cpu"
    ) -> None:
        if not 0.0 < ratio <= 1.0:
            raise CoresetError(f"coreset ratio must be in (0, 1], got {ratio}")
        if projection_dim < 1:
            raise CoresetError(f"coreset projection_dim must be >= 1, got {projection_dim}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.seed = seed
        self.device = torch.device(device)

    def sample(self, features: np.ndarray) -> np.ndarray:
        """Return max(1, ceil(ratio * N)) unique int64 row indices of `features`, in pick order."""
        array = _as_features(features)
        count = max(1, math.ceil(self.ratio * array.shape[0]))
        with torch.no_grad():
            projected = self._project(array)
            first = int(np.random.default_rng(self.seed).integers(array.shape[0]))
            return _LazyGreedy(projected).run(first, count)

    def _project(self, array: np.ndarray) -> torch.Tensor:
        """Project to projection_dim dims with a seeded Gaussian JL matrix (pairwise distances
        are kept up to a small factor), or just move to the device when D is already small."""
        tensor = torch.from_numpy(array).to(self.device)
        dim = array.shape[1]
        if dim <= self.projection_dim:
            return tensor
        generator = torch.Generator().manual_seed(self.seed)
        matrix = torch.randn(dim, self.projection_dim, generator=generator)
        matrix = (matrix / math.sqrt(self.projection_dim)).to(self.device)
        return tensor @ matrix


class _LazyGreedy:
    """One run of the lazy greedy k-center described in ApproximateGreedyCoresetSampler."""

    def __init__(self, points: torch.Tensor) -> None:
        self.points = points
        self.norms = torch.linalg.vector_norm(points, dim=1).square_()
        total, dim = points.shape
        self.min_d2 = torch.full((total,), math.inf, device=points.device)
        size = min(total, _CANDIDATES)
        self.cand_points = torch.empty((size, dim), device=points.device)
        self.cand_norms = torch.empty(size, device=points.device)
        self.cand_d2 = torch.empty(size, device=points.device)
        self.step_d2 = torch.empty(size, device=points.device)
        self.block = torch.empty(_BLOCK_ELEMENTS, device=points.device)
        self.row_min = torch.empty(total, device=points.device)

    def run(self, first: int, count: int) -> np.ndarray:
        chosen = [first]
        pending = [first]
        while len(chosen) < count:
            self._fold_in(pending)
            pending = self._pick_from_candidates(count - len(chosen))
            chosen.extend(pending)
        return np.asarray(chosen, dtype=np.int64)

    def _fold_in(self, centres: list[int]) -> None:
        """min_d2 = min(min_d2, squared distance to each centre), in row blocks of bounded size."""
        index = torch.tensor(centres, device=self.points.device)
        centre_points = self.points[index]
        centre_norms = self.norms[index]
        rows = max(1, _BLOCK_ELEMENTS // len(centres))
        for start in range(0, self.points.shape[0], rows):
            stop = min(start + rows, self.points.shape[0])
            block = self.block[: (stop - start) * len(centres)].view(stop - start, len(centres))
            torch.addmm(centre_norms, self.points[start:stop], centre_points.T, alpha=-2, out=block)
            row_min = self.row_min[start:stop]
            torch.amin(block, dim=1, out=row_min)
            row_min += self.norms[start:stop]
            row_min.clamp_(min=0.0)
            torch.minimum(self.min_d2[start:stop], row_min, out=self.min_d2[start:stop])
        self.min_d2[index] = -1.0  # chosen: never picked again, even among exact duplicates

    def _pick_from_candidates(self, budget: int) -> list[int]:
        """Pick farthest points from the candidate set while provably globally farthest."""
        size = self.cand_d2.shape[0]
        top = torch.topk(self.min_d2, min(size + 1, self.min_d2.shape[0]))
        cand_index = top.indices[:size]
        bound = float(top.values[size]) if top.values.shape[0] > size else -math.inf
        torch.index_select(self.points, 0, cand_index, out=self.cand_points)
        torch.index_select(self.norms, 0, cand_index, out=self.cand_norms)
        self.cand_d2.copy_(top.values[:size])
        cand_ids = cand_index.cpu().numpy()
        picked: list[int] = []
        with _one_thread():
            while len(picked) < budget:
                value, slot = torch.max(self.cand_d2, dim=0)
                if float(value) < bound:
                    break
                slot = int(slot)
                picked.append(int(cand_ids[slot]))
                self._update_candidates(slot)
        self.min_d2[cand_index] = self.cand_d2
        return picked

    def _update_candidates(self, slot: int) -> None:
        """Fold the newly picked candidate into the candidates' distances, in place."""
        step = self.step_d2
        torch.addmv(self.cand_norms, self.cand_points, self.cand_points[slot], alpha=-2, out=step)
        step += self.cand_norms[slot]
        step.clamp_(min=0.0)
        torch.minimum(self.cand_d2, step, out=self.cand_d2)
        self.cand_d2[slot] = -1.0


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the per-pick candidate updates on one CPU thread. Each touches only _CANDIDATES rows,
    too little to split, and a split op waits for every pool thread: on a busy machine, for a
    thread the scheduler has set aside. With 2 threads, while another process kept one of the
    2 cores busy, a 131k-patch coreset took 86 s instead of 3.7 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class ChunkedSelection:
    """Rows selected from a stream of batches, holding at most about ``chunk_rows`` at a time.

    Batches are buffered until ``chunk_rows`` rows are pending; ``select`` then keeps some rows
    of that chunk (for the coreset: ``ApproximateGreedyCoresetSampler(ratio).sample``) and the
    rest are dropped. The result is the union of what each chunk kept, in order, with the
    row-aligned ``payload`` of each kept row (fit: its grid cell). With ``chunk_rows`` None, or
    a stream of at most ``chunk_rows`` rows (plus the batch that reached it), the one chunk is
    all rows: exactly what ``select`` would keep of them all at once.

    Why chunks: greedy k-center over N rows costs O(N * k) = O(ratio * N^2) and holds all N
    rows; per chunk of C rows it costs O(ratio * N * C) and holds O(C + ratio * N). This is the
    first round of composable (distributed) k-center coresets (Malkomes et al., NeurIPS 2015),
    without the second greedy over the union, which would cost O(ratio^2 * N^2) again. Every
    row stays within its own chunk's greedy radius, so the union's coverage radius is at most
    the largest chunk's; against one greedy over all rows it spends picks on regions every
    chunk covers (more redundancy, fewer picks in rare regions). Measured (docs/performance.md,
    "Fit that scales with the images"): on 502k real patches, 4 chunks of CHUNK_ROWS kept the
    held-out s* AUROC of greedy over all of them; tests/test_coreset.py bounds the radius.
    """

    def __init__(self, select: Callable[[np.ndarray], np.ndarray], chunk_rows: int | None) -> None:
        if chunk_rows is not None and chunk_rows < 1:
            raise CoresetError(f"chunk_rows must be >= 1 or None, got {chunk_rows}")
        self.select = select
        self.chunk_rows = chunk_rows
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._kept: list[tuple[np.ndarray, np.ndarray]] = []
        self.seconds = 0.0  # spent in ``select`` (fit's coreset time)

    def add(self, rows: np.ndarray, payload: np.ndarray) -> None:
        """Buffer a batch of rows (and its payload); select from the chunk once it is full."""
        if len(rows) != len(payload):
            raise CoresetError(f"{len(rows)} rows but {len(payload)} payload rows")
        self._pending.append((rows, payload))
        self._pending_rows += len(rows)
        if self.chunk_rows is not None and self._pending_rows >= self.chunk_rows:
            self._reduce()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Every kept row and its payload, in chunk order, each chunk in ``select``'s order."""
        self._reduce()
        if not self._kept:
            raise CoresetError("no rows were added to select from")
        rows, payload = zip(*self._kept, strict=True)
        return np.concatenate(rows), np.concatenate(payload)

    def _reduce(self) -> None:
        if not self._pending:
            return
        rows = np.concatenate([r for r, _ in self._pending])
        payload = np.concatenate([p for _, p in self._pending])
        self._pending, self._pending_rows = [], 0
        start = time.perf_counter()
        selected = self.select(rows)
        self.seconds += time.perf_counter() - start
        self._kept.append((rows[selected], payload[selected]))


class RandomSubsampler:
    """The seed notebook's cap: keep a seeded uniform random subset of at most max_size rows."""

    def __init__(self, max_size: int, seed: int = 0) -> None:
        if max_size < 1:
            raise CoresetError(f"random subsample max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.seed = seed

    def sample(self, features: np.ndarray) -> np.ndarray:
        """Return sorted unique int64 indices: all rows if N <= max_size, else max_size of them."""
        total = _as_features(features).shape[0]
        if total <= self.max_size:
            return np.arange(total, dtype=np.int64)
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(total, size=self.max_size, replace=False)).astype(np.int64)


def coverage_radius(features: np.ndarray, selected: np.ndarray) -> float:
    """Largest distance from any row of `features` to its nearest selected row: the quantity
    greedy k-center minimises, used to compare coresets (exact, via FAISS flat search)."""
    array = _as_features(features)
    index = np.asarray(selected, dtype=np.int64)
    if index.ndim != 1 or index.size == 0:
        raise CoresetError("selected must be a non-empty 1-D array of row indices")
    if index.min() < 0 or index.max() >= array.shape[0]:
        raise CoresetError(f"selected indices must be in [0, {array.shape[0]})")
    flat = faiss.IndexFlatL2(array.shape[1])
    flat.add(array[index])
    squared, _ = flat.search(array, 1)
    return float(math.sqrt(max(float(squared.max()), 0.0)))
