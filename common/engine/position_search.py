"""Position-aware nearest neighbours: a test patch searches only the bank patches that came from
grid cells near its own (issue 23, for aligned parts such as solar cells).

A test patch at grid cell (i, j) is compared with the bank patches whose cell (i', j') has
|i - i'| <= r and |j - j'| <= r (Chebyshev radius r, ``PatchCoreConfig.position_radius``): on
an aligned part a busbar at the top must match a busbar at the top, not a look-alike elsewhere.
The nearest bank patch within reach is found exactly; a patch with no bank patch within r (a
cell the coreset left empty, with a small r) takes its nearest anywhere in the bank instead
(MemoryBank.search_near), so every patch still gets a distance.

Search: each grid cell keeps a CSR list (offsets, rows) of the bank rows within r of it, built
once per radius. A batch's queries are grouped by cell and each group is scored against its
cell's rows by one matmul (||b||^2 - 2 q.b, as the torch index does) and an argmin. A query
meets the N (2r + 1)^2 / (h w) bank rows within reach and no others, so the search is exact and
its cost is a fixed share of the bank's, whatever the bank size. Measured with
bench/candidates_cost.py (elpv mono cells, 224 px, 28 x 28 grid, 12.5k-patch coreset bank of
152-dim features, one thread): in batches of 32, 2.3 / 3.4 / 5.1 ms CPU per image at r = 1 / 2 /
3 (fallback and exact distances included), against 22 for the IVF index "auto" picks at that
size. Each cell's rows are gathered once per batch, so that cost is shared by the batch's
images: one image alone costs 32 / 40 / 62 ms against IVF's 23 (workers score batches; a
batch of one is the isolation of a batch a worker was lost on). The price is memory: the lists
hold about (2r + 1)^2 int32 row numbers per bank row (r = 2: 100 bytes per patch, a sixth of a
152-dim float32 patch).

Measured on a prototype and not chosen (random 152-dim vectors, 12.5k bank, the search alone,
r = 2, one thread): tiles of T x T cells sharing one list of the rows within r of any of their
cells, searched by one matmul per tile with the pairs farther than r masked out. Fewer, larger
matmuls, but the mask (a query x row comparison of cells) and the (T + 2r)^2 rows met cost more
than they save: 5.1 ms per image at T = 2, 9.4 at T = 4, 270 at T = 28 (one tile), against 3.2
per cell and 30 for an exact flat search of the whole bank. Not tried: a FAISS flat index with
an IDSelector per cell still visits every bank id for each query (the selector only skips the
distance), a full flat search per cell; one sub-index per cell would copy each bank row into
(2r + 1)^2 indexes.
"""

from __future__ import annotations

import numpy as np
import torch

# Queries x bank rows of one score block: 64 MB of float32, as the torch index's CPU block.
_BLOCK_ELEMENTS = 1 << 24


def grid_positions(images: int, height: int, width: int) -> np.ndarray:
    """(images * height * width, 2) int16 (row, column) grid cell of each row of patch features
    stacked from (images, height, width, D): row n comes from cell n % (height * width)."""
    cells = np.arange(height * width)
    one_image = np.stack([cells // width, cells % width], axis=1).astype(np.int16)
    return np.tile(one_image, (images, 1))


class NeighbourhoodSearch:
    """Exact nearest bank row among those within Chebyshev ``radius`` of each query's cell."""

    def __init__(self, vectors: torch.Tensor, positions: np.ndarray, radius: int) -> None:
        self.vectors = vectors
        self.norms = torch.linalg.vector_norm(vectors, dim=1).square_()
        cells = positions.astype(np.int64)
        # A cell beyond the bank's farthest one by more than r has no bank row within reach.
        self.grid = cells.max(axis=0) + radius + 1
        offsets, rows = _cell_members(cells, radius, self.grid)
        self.offsets = offsets.tolist()  # Python ints: sliced once per cell and batch
        self.counts = np.diff(offsets)
        self.rows = torch.from_numpy(rows).to(vectors.device)  # int32: half the memory

    def nearest(self, queries: torch.Tensor, cells: np.ndarray) -> np.ndarray:
        """(M,) index of each query's nearest bank row within the radius of its cell (M, 2),
        -1 where there is none."""
        found = np.full(len(cells), -1, np.int64)
        cell_ids = self._cell_ids(cells.astype(np.int64))
        # The queries with a bank row within reach, grouped by cell.
        reachable = np.flatnonzero((cell_ids >= 0) & (self.counts[cell_ids] > 0))
        order = reachable[np.argsort(cell_ids[reachable], kind="stable")]
        if not len(order):
            return found
        sorted_ids = cell_ids[order].tolist()
        starts = np.flatnonzero(np.diff(cell_ids[order], prepend=-1))
        stops = np.r_[starts[1:], len(order)]
        grouped = torch.from_numpy(order).to(self.vectors.device)
        nearest = [
            self._nearest_among(queries.index_select(0, grouped[start:stop]), sorted_ids[start])
            for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)
        ]
        found[order] = torch.cat(nearest).cpu().numpy()
        return found

    def _cell_ids(self, cells: np.ndarray) -> np.ndarray:
        """Row-major id of each query cell; -1 for cells beyond the grid of any bank row."""
        inside = (cells < self.grid).all(axis=1)
        return np.where(inside, cells[:, 0] * self.grid[1] + cells[:, 1], -1)

    def _nearest_among(self, queries: torch.Tensor, cell: int) -> torch.Tensor:
        """The nearest bank row to each of ``queries`` among the rows listed for ``cell``."""
        rows = self.rows[self.offsets[cell] : self.offsets[cell + 1]]
        # index_select: a third of the time of advanced indexing for these small gathers.
        candidates, norms = self.vectors.index_select(0, rows), self.norms.index_select(0, rows)
        chunk = max(1, _BLOCK_ELEMENTS // len(rows))
        with torch.no_grad():
            return torch.cat(
                [
                    rows[torch.addmm(norms, part, candidates.T, alpha=-2).argmin(dim=1)]
                    for part in queries.split(chunk)
                ]
            )


def _cell_members(
    cells: np.ndarray, radius: int, grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets (cells + 1,) int64, rows int32) of the bank rows within ``radius`` of each
    cell of ``grid`` (row-major); a bank row at cell p serves the cells p - r .. p + r."""
    ids: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    for di in range(-radius, radius + 1):
        for dj in range(-radius, radius + 1):
            served = cells + np.array([di, dj])
            ok = ((served >= 0) & (served < grid)).all(axis=1)
            ids.append(served[ok, 0] * grid[1] + served[ok, 1])
            rows.append(np.flatnonzero(ok).astype(np.int32))
    cell_ids, members = np.concatenate(ids), np.concatenate(rows)
    order = np.argsort(cell_ids, kind="stable")
    offsets = np.zeros(int(grid[0] * grid[1]) + 1, np.int64)
    np.cumsum(np.bincount(cell_ids, minlength=len(offsets) - 1), out=offsets[1:])
    return offsets, members[order]
