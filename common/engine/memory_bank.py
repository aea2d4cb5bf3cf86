"""The PatchCore memory bank: nearest-neighbour search of patch features over kept normal patches.

Exact FAISS flat L2 by default; HNSW, IVF or IVF-PQ (4-bit codes, candidates re-ranked from the
float vectors) for large banks; a chunked torch matmul search when the bank lives on a GPU
without faiss-gpu (and on CPU as index="torch"). Whatever finds the neighbours, the distances
returned are recomputed directly from the vectors, so they are true L2 distances (FAISS returns
squared ones, coded ones are approximate, and the matmul expansion loses precision near zero).

A bank may also hold the grid cell each patch came from (``positions``): ``search_near`` then
finds each query's nearest patch among those from cells near the query's own
(common/engine/position_search.py).
"""

from __future__ import annotations

import math
import threading
import warnings

import faiss
import numpy as np
import torch

from common.engine.position_search import NeighbourhoodSearch
from common.errors import PatchqError

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq", "torch")
HNSW_NEIGHBOURS = 32
# "auto" switches from exact search to IVF at this bank size. Measured on Lite0 features of the
# elpv cells (bench/run.py): below it flat search costs < 15 ms per 224-px image on 2 cores; at
# 23.5k patches IVF was ~3x faster than flat with recall@1 1.000 and the same AUROC.
AUTO_IVF_MIN_SIZE = 8192
# Bank vectors an IVF query scans beyond its centroids (default_nprobe): N/8 at 12.3k patches,
# where the 1/8 rule was measured to keep recall@1 ~1.0; fixed from there on.
IVF_SCAN_BUDGET = 1536
IVF_MIN_NPROBE = 8
# "auto" switches from IVF to "ivfpq" at this bank size: IVF's k-means over ~4 sqrt(N) lists
# trains on every vector, which costs N^1.5 and took minutes at 1M patches (docs/performance.md).
AUTO_IVFPQ_MIN_SIZE = 262_144
# "ivfpq": bank vectors coded with one 4-bit code per dimension (FAISS fast-scan) in ~2 sqrt(N)
# lists, the coarse k-means trained on at most this many vectors per list; each query takes its
# PQ_CANDIDATES nearest codes and keeps the truly nearest of them from the float vectors.
PQ_TRAIN_PER_LIST = 64
PQ_CANDIDATES = 64
# Lists an "ivfpq" query scans. Its recall is bound by the lists it probes, not the candidates:
# on 577k real patches (elpv poly good cells, 65 of its test cells as queries, 2 threads) 8
# lists gave recall@1 0.941 at 58 CPU ms/image, 16 lists 0.980 at 67 ms, 32 lists 0.994 at
# 93 ms, and 128 candidates instead of 64 added ~25 ms and no recall (docs/performance.md).
PQ_NPROBE = 16
# Query rows per chunk times bank rows: bounds the (queries x bank) score block of the torch
# search to 64 MB on CPU and 1 GB on GPU.
_TORCH_BLOCK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
# Elements gathered at once when recomputing exact distances (64 MB of float32).
_GATHER_ELEMENTS = 1 << 24


class MemoryBankError(PatchqError):
    """Bad bank vectors, queries or index settings; the message names the value and the fix."""


def as_float_matrix(array: np.ndarray, name: str, error: type[PatchqError]) -> np.ndarray:
    """Validate a non-empty finite (N, D) float matrix; return it float32 C-contiguous (no copy
    when it already is). Checked in row chunks so a large bank needs no N x D mask."""
    matrix = np.asarray(array)
    if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise error(f"{name} must be a non-empty (N, D) matrix, got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.floating):
        raise error(f"{name} must be floating point, got dtype {matrix.dtype}")
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows = 65536
    if not all(np.isfinite(matrix[i : i + rows]).all() for i in range(0, len(matrix), rows)):
        raise error(f"{name} contain NaN or infinite values; check the feature extractor")
    return matrix


def as_tensor(matrix: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 matrix as a tensor on ``device``, shared with the array on CPU. A bank may be
    built on another bank's read-only vectors (fit's exact-search audit); the searches only read
    them, so torch's warning about wrapping a read-only array is silenced here alone."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(matrix).to(device)


def resolve_index(index: str, size: int, gpu: bool = False) -> str:
    """The concrete index type for ``index`` ("auto" picks by bank size, and keeps IVF for
    large banks on a FAISS GPU, which trains it fast and has no fast-scan PQ)."""
    if index != "auto":
        return index
    if size >= AUTO_IVFPQ_MIN_SIZE and not gpu:
        return "ivfpq"
    return "ivf" if size >= AUTO_IVF_MIN_SIZE else "flat"


def saved_index(index: str, size: int) -> str:
    """The index a saved model's config asks for. "auto" in a model file means what it meant
    before "ivfpq" existed (fit names that choice, PatchCoreConfig.index), so a model saved
    before it searches a large bank with IVF, as it did."""
    return "ivf" if index == "auto" and size >= AUTO_IVFPQ_MIN_SIZE else index


def default_nlist(size: int) -> int:
    """IVF list count: ~4 sqrt(N), but never so many that a list gets < 39 training points
    (FAISS's k-means minimum)."""
    return max(1, min(round(4 * math.sqrt(size)), size // 39))


def default_nprobe(nlist: int, size: int) -> int:
    """Lists scanned per IVF query: 1/8 of them, but no more than it takes to scan about
    IVF_SCAN_BUDGET bank vectors, and at least IVF_MIN_NPROBE.

    The trade-off (issue 25): 1/8 of the lists scans N/8 vectors per query, so the search cost
    grew linearly with the bank (2.2x slower scoring for a 4x bank). With the budget, a query
    costs nlist (~4 sqrt(N)) centroid distances plus ~IVF_SCAN_BUDGET vector distances: the
    cost grows as sqrt(N). Memory is unchanged (the lists hold the full float32 vectors, so the
    distances of the candidates found are exact and re-ranking them would change nothing). The
    price is recall: a fixed budget probes a shrinking share of a growing bank's lists, so a
    query whose true nearest patch lies in a list it skips gets a slightly larger distance.
    ``fit`` measures that cost on the held-out images against the exact search (validation
    "search"); banks up to 8 x IVF_SCAN_BUDGET patches probe 1/8 of their lists as before.
    """
    by_budget = math.ceil(IVF_SCAN_BUDGET * nlist / size)
    return min(nlist, max(IVF_MIN_NPROBE, min(nlist // 8, by_budget)))


def pq_nlist(size: int) -> int:
    """The list count of "ivfpq": ~2 sqrt(N), fewer than IVF's 4 sqrt(N) because assigning
    every vector to a list (N x nlist distances) is most of its build, and scanning codes is
    cheap."""
    return max(1, min(round(2 * math.sqrt(size)), size // 39))


def true_distances(vectors: np.ndarray, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """L2 distances (M, k) float32 from each query to its ``indices`` rows of ``vectors``,
    computed directly in row chunks (a -1 index, found by no search, is at infinity)."""
    distances = np.empty(indices.shape, dtype=np.float32)
    rows = max(1, _GATHER_ELEMENTS // (indices.shape[1] * vectors.shape[1]))
    for start in range(0, queries.shape[0], rows):
        stop = start + rows
        diff = vectors[indices[start:stop]] - queries[start:stop, None, :]
        distances[start:stop] = np.linalg.norm(diff, axis=2)
    distances[indices < 0] = np.inf
    return distances


class _TorchSearch:
    """Exact k-NN by ||q||^2 - 2 q.b + ||b||^2 in query chunks (||q||^2 does not change ranks)."""

    def __init__(self, vectors: np.ndarray, device: torch.device) -> None:
        self.bank = as_tensor(vectors, device)
        self.bank_norms = torch.linalg.vector_norm(self.bank, dim=1).square_()
        self.rows = max(1, _TORCH_BLOCK_ELEMENTS[device.type] // vectors.shape[0])

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        found = []
        with torch.no_grad():
            for start in range(0, queries.shape[0], self.rows):
                chunk = torch.from_numpy(queries[start : start + self.rows]).to(self.bank.device)
                scores = torch.addmm(self.bank_norms, chunk, self.bank.T, alpha=-2)
                found.append(torch.topk(scores, k, dim=1, largest=False).indices.cpu())
        return torch.cat(found).numpy()


class _FaissSearch:
    """A FAISS index built on the bank, moved to GPU 0 when asked and faiss-gpu supports it."""

    def __init__(
        self, vectors: np.ndarray, index: str, ef_search: int, nprobe: int | None, gpu: bool
    ) -> None:
        size, dim = vectors.shape
        self.ef_search = ef_search
        self.vectors = vectors  # "ivfpq" re-ranks its candidates from them (not a copy)
        self.candidates = PQ_CANDIDATES if index == "ivfpq" else 0
        if index == "flat":
            self.index = faiss.IndexFlatL2(dim)
        elif index == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, HNSW_NEIGHBOURS)
        else:
            nlist = pq_nlist(size) if index == "ivfpq" else default_nlist(size)
            self.quantizer = faiss.IndexFlatL2(dim)  # the IVF index does not own it
            if index == "ivfpq":
                self.index = faiss.IndexIVFPQFastScan(self.quantizer, dim, nlist, dim, 4)
                self.index.train(_training_sample(vectors, nlist * PQ_TRAIN_PER_LIST))
            else:
                self.index = faiss.IndexIVFFlat(self.quantizer, dim, nlist)
                self.index.train(vectors)
            if nprobe is None:
                nprobe = min(nlist, PQ_NPROBE) if index == "ivfpq" else default_nprobe(nlist, size)
            self.index.nprobe = nprobe
        self.index.add(vectors)
        if gpu and index in ("flat", "ivf"):  # FAISS has no GPU HNSW or fast-scan PQ
            self.resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self.resources, 0, self.index)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        if isinstance(self.index, faiss.IndexHNSW):
            self.index.hnsw.efSearch = max(self.ef_search, k)
        _, indices = self.index.search(queries, max(k, self.candidates))
        if self.candidates:  # coded distances are approximate: keep the truly nearest k
            nearest = np.argsort(true_distances(self.vectors, queries, indices), axis=1)[:, :k]
            indices = np.take_along_axis(indices, nearest, 1)
        return indices.astype(np.int64)


def _training_sample(vectors: np.ndarray, rows: int) -> np.ndarray:
    """At most ``rows`` of the bank, a seeded random choice (the same bank, the same index)."""
    if len(vectors) <= rows:
        return vectors
    chosen = np.random.default_rng(0).choice(len(vectors), rows, replace=False)
    return vectors[np.sort(chosen)]


class MemoryBank:
    """Kept normal patch features and nearest-neighbour search over them.

    index: "auto" (default: flat for small banks, ivf from AUTO_IVF_MIN_SIZE patches on),
    "flat" (exact), "hnsw" (graph, M=32, `ef_search` candidates per query),
    "ivf" (inverted lists, nlist ~ 4 sqrt(N) trained on the bank, `nprobe` lists per query,
    by default default_nprobe's fixed scan budget),
    "ivfpq" (auto from AUTO_IVFPQ_MIN_SIZE patches on CPU: ~2 sqrt(N) lists trained on a
    sample, 4-bit codes per dimension, PQ_NPROBE lists per query, the PQ_CANDIDATES nearest
    codes re-ranked exactly),
    "torch" (exact chunked matmul). On device "cuda", FAISS runs on the GPU when faiss-gpu is
    installed (HNSW and IVF-PQ stay on CPU; "auto" picks IVF there for every large bank);
    otherwise every index type becomes the exact torch search on the GPU, which is faster there
    than any CPU index.

    positions: optional (N, 2) grid cell (row, column) of each bank patch, for ``search_near``.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        index: str = "auto",
        device: str = "cpu",
        *,
        ef_search: int = 64,
        nprobe: int | None = None,
        positions: np.ndarray | None = None,
    ) -> None:
        if index not in INDEX_TYPES:
            raise MemoryBankError(
                f"unknown index {index!r}; choose one of {', '.join(INDEX_TYPES)}"
            )
        if ef_search < 1 or (nprobe is not None and nprobe < 1):
            raise MemoryBankError("ef_search and nprobe must be >= 1")
        target = torch.device(device)
        if target.type == "cuda" and not torch.cuda.is_available():
            raise MemoryBankError(f"device {device!r} asked for but CUDA is not available; use cpu")
        self._vectors = as_float_matrix(vectors, "bank vectors", MemoryBankError)
        self._positions = None if positions is None else self._checked_positions(positions)
        self._device = target
        self._near: dict[int, NeighbourhoodSearch] = {}
        self._near_lock = threading.Lock()
        gpu_faiss = target.type == "cuda" and faiss.get_num_gpus() > 0
        index = resolve_index(index, self._vectors.shape[0], gpu_faiss)
        self._index_type = index
        if index == "torch" or (target.type == "cuda" and not gpu_faiss):
            self._backend: _TorchSearch | _FaissSearch = _TorchSearch(self._vectors, target)
        else:
            self._backend = _FaissSearch(self._vectors, index, ef_search, nprobe, gpu_faiss)

    @property
    def vectors(self) -> np.ndarray:
        """The bank, float32 (N, D), as a read-only view."""
        view = self._vectors.view()
        view.flags.writeable = False
        return view

    @property
    def positions(self) -> np.ndarray | None:
        """The grid cell (row, column) of each bank row, int16 (N, 2) read-only; None if not
        kept."""
        if self._positions is None:
            return None
        view = self._positions.view()
        view.flags.writeable = False
        return view

    @property
    def index_type(self) -> str:
        return self._index_type

    @property
    def device(self) -> str:
        """Where the bank searches: "cpu" or "cuda" (a copy searches where it does)."""
        return self._device.type

    @property
    def dim(self) -> int:
        return self._vectors.shape[1]

    @property
    def size(self) -> int:
        return self._vectors.shape[0]

    @property
    def backend(self) -> str:
        """What actually searches: "torch" or "faiss" (for logs and benchmarks)."""
        return "torch" if isinstance(self._backend, _TorchSearch) else "faiss"

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """k nearest bank rows per query: (true L2 distances (M, k) float32 ascending,
        indices (M, k) int64)."""
        matrix = self._checked_queries(queries)
        if not 1 <= k <= self.size:
            raise MemoryBankError(f"k must be in [1, {self.size}] (the bank size), got {k}")
        indices = self._backend.search(matrix, k)
        missing = (indices < 0).any(axis=1)
        if missing.any():  # an approximate index found fewer than k: answer those rows exactly
            indices[missing] = _TorchSearch(self._vectors, torch.device("cpu")).search(
                matrix[missing], k
            )
        return self._exact_sorted(matrix, indices)

    def search_near(
        self, queries: np.ndarray, cells: np.ndarray, radius: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The nearest bank row per query among those from grid cells within Chebyshev
        ``radius`` of the query's cell (``cells``, (M, 2) row and column), exactly; a query
        with no bank row within reach gets its nearest anywhere (``search``). Returns what
        ``search(queries, k=1)`` does: true L2 distances (M, 1) and indices (M, 1)."""
        if self._positions is None:
            raise MemoryBankError(
                "this bank does not hold its patches' grid positions; refit the model with "
                "--position-radius"
            )
        matrix = self._checked_queries(queries)
        cells = np.asarray(cells)
        if cells.shape != (len(matrix), 2):
            raise MemoryBankError(f"cells must be ({len(matrix)}, 2), got shape {cells.shape}")
        found = self._neighbourhoods(radius).nearest(self._on_device(matrix), cells)
        missing = found < 0
        if missing.any():
            found[missing] = self.search(matrix[missing], k=1)[1][:, 0]
        return self._exact_sorted(matrix, found[:, None])

    def _checked_queries(self, queries: np.ndarray) -> np.ndarray:
        matrix = as_float_matrix(queries, "queries", MemoryBankError)
        if matrix.shape[1] != self.dim:
            raise MemoryBankError(
                f"queries have {matrix.shape[1]} dims but the bank has {self.dim}"
            )
        return matrix

    def _checked_positions(self, positions: np.ndarray) -> np.ndarray:
        cells = np.asarray(positions)
        if cells.shape != (self.size, 2) or not np.issubdtype(cells.dtype, np.integer):
            raise MemoryBankError(
                f"positions must be integer ({self.size}, 2) grid cells, one per bank row, got "
                f"{cells.dtype} {cells.shape}"
            )
        if cells.min() < 0 or cells.max() > np.iinfo(np.int16).max:
            raise MemoryBankError("positions must be grid cells in [0, 32767]")
        return cells.astype(np.int16)

    def _neighbourhoods(self, radius: int) -> NeighbourhoodSearch:
        """The position-aware search for ``radius``, built on first use and kept."""
        if radius < 0:
            raise MemoryBankError(f"radius must be >= 0 grid cells, got {radius}")
        with self._near_lock:  # the scoring threads of a pipelined worker share the bank
            if radius not in self._near:
                assert self._positions is not None
                vectors = self._on_device(self._vectors)
                self._near[radius] = NeighbourhoodSearch(vectors, self._positions, radius)
            return self._near[radius]

    def _on_device(self, matrix: np.ndarray) -> torch.Tensor:
        """A float32 matrix as a tensor on the bank's device (no copy on CPU)."""
        return as_tensor(matrix, self._device)

    def _exact_sorted(
        self, queries: np.ndarray, indices: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Recompute distances to the found rows directly and sort each row ascending."""
        distances = true_distances(self._vectors, queries, indices)
        order = np.argsort(distances, axis=1, kind="stable")
        return np.take_along_axis(distances, order, 1), np.take_along_axis(indices, order, 1)
