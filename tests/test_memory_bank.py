"""Memory bank: true L2 distances equal brute force; approximate indexes keep high recall."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engine.memory_bank import MemoryBank, MemoryBankError
from common.errors import PatchqError


def _brute_force(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """All query-to-bank L2 distances in float64, straight from the definition."""
    diff = queries[:, None, :].astype(np.float64) - bank[None, :, :].astype(np.float64)
    return np.sqrt((diff**2).sum(axis=2))


def _patch_like(rows: int, dim: int, seed: int) -> np.ndarray:
    """Random points around 40 random centres: structured like patch features, unlike iid noise
    (on which no approximate index keeps its recall)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim)) * 3
    return (centres[rng.integers(0, 40, rows)] + rng.standard_normal((rows, dim))).astype(
        np.float32
    )


@pytest.mark.parametrize("index", ["flat", "torch"])
def test_exact_indexes_equal_brute_force(index: str) -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((700, 24)).astype(np.float32)
    queries = np.vstack([rng.standard_normal((60, 24)), bank[:5]]).astype(np.float32)
    distances, indices = MemoryBank(bank, index).search(queries, k=3)
    truth = _brute_force(bank, queries)
    expected = np.sort(truth, axis=1)[:, :3]
    np.testing.assert_allclose(distances, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(truth, indices, 1), expected, rtol=1e-5)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    assert distances.shape == indices.shape == (65, 3)
    np.testing.assert_array_equal(indices[60:, 0], np.arange(5))  # a bank row finds itself
    np.testing.assert_array_equal(distances[60:, 0], 0.0)


@pytest.mark.parametrize("index", ["hnsw", "ivf", "ivfpq"])
def test_approximate_indexes_keep_recall_and_return_true_distances(index: str) -> None:
    bank = _patch_like(3000, 32, seed=1)
    queries = _patch_like(200, 32, seed=2)
    distances, indices = MemoryBank(bank, index).search(queries, k=5)
    truth = _brute_force(bank, queries)
    nearest = np.argsort(truth, axis=1)[:, :5]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(indices, nearest, strict=True)])
    assert recall >= 0.9
    np.testing.assert_allclose(distances, np.take_along_axis(truth, indices, 1), rtol=1e-5)
    assert np.all(np.diff(distances, axis=1) >= 0)
    assert all(len(set(row)) == 5 for row in indices) and (indices >= 0).all()


def test_ivfpq_probes_pq_nprobe_lists_by_default() -> None:
    from common.engine.memory_bank import PQ_NPROBE, pq_nlist

    bank = _patch_like(3000, 32, seed=1)
    queries = _patch_like(300, 32, seed=2)
    assert pq_nlist(len(bank)) > 2 * PQ_NPROBE  # so that the probe count shows in the answers
    found = MemoryBank(bank, "ivfpq").search(queries, k=1)[1]
    np.testing.assert_array_equal(
        found, MemoryBank(bank, "ivfpq", nprobe=PQ_NPROBE).search(queries, k=1)[1]
    )
    assert not np.array_equal(found, MemoryBank(bank, "ivfpq", nprobe=1).search(queries, k=1)[1])


def test_ivf_answers_every_row_even_when_probed_lists_hold_fewer_than_k() -> None:
    bank = _patch_like(2000, 8, seed=3)
    distances, indices = MemoryBank(bank, "ivf", nprobe=1).search(bank[:50], k=200)
    assert (indices >= 0).all() and np.isfinite(distances).all()


def test_properties_and_float64_input() -> None:
    bank = np.random.default_rng(4).standard_normal((10, 3))
    memory = MemoryBank(bank, "hnsw")
    assert (memory.size, memory.dim, memory.index_type, memory.backend) == (10, 3, "hnsw", "faiss")
    assert memory.vectors.dtype == np.float32 and memory.vectors.flags.c_contiguous
    assert not memory.vectors.flags.writeable
    assert MemoryBank(bank, "torch").backend == "torch"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_search_equals_cpu() -> None:
    bank = _patch_like(5000, 64, seed=5)
    queries = _patch_like(300, 64, seed=6)
    expected = MemoryBank(bank).search(queries, k=2)
    for index in ("flat", "ivf", "torch"):
        got = MemoryBank(bank, index, device="cuda").search(queries, k=2)
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-4)


@pytest.mark.parametrize(
    ("vectors", "index", "fragment"),
    [
        (np.zeros((0, 4)), "flat", "non-empty"),
        (np.zeros(4), "flat", "matrix"),
        (np.array([[1.0, np.inf]]), "flat", "NaN or infinite"),
        (np.zeros((2, 2), np.int32), "flat", "floating"),
        (np.zeros((2, 2)), "annoy", "unknown index"),
    ],
)
def test_bad_banks_are_one_line_patchq_errors(
    vectors: np.ndarray, index: str, fragment: str
) -> None:
    with pytest.raises(PatchqError, match=fragment) as caught:
        MemoryBank(vectors, index)
    assert "\n" not in str(caught.value)


def test_bad_queries_and_k_are_rejected() -> None:
    memory = MemoryBank(np.zeros((4, 3), np.float32))
    for queries, k in [(np.zeros((2, 5)), 1), (np.zeros((2, 3)), 0), (np.zeros((2, 3)), 5)]:
        with pytest.raises(MemoryBankError):
            memory.search(queries, k)
    with pytest.raises(MemoryBankError, match="NaN"):
        memory.search(np.full((1, 3), np.nan), 1)


def test_auto_index_is_exact_for_small_banks_and_ivf_for_large_ones() -> None:
    from common.engine.memory_bank import AUTO_IVF_MIN_SIZE

    rng = np.random.default_rng(3)
    assert MemoryBank(rng.standard_normal((100, 8)).astype(np.float32)).index_type == "flat"
    large = rng.standard_normal((AUTO_IVF_MIN_SIZE, 8)).astype(np.float32)
    bank = MemoryBank(large)
    assert bank.index_type == "ivf"
    distances, indices = bank.search(large[:50], 1)
    np.testing.assert_array_equal(indices[:, 0], np.arange(50))  # each row finds itself
    assert np.all(distances == 0)


def test_auto_codes_the_largest_banks_but_not_on_a_faiss_gpu_nor_for_older_models() -> None:
    from common.engine.memory_bank import AUTO_IVFPQ_MIN_SIZE, resolve_index, saved_index

    assert resolve_index("auto", AUTO_IVFPQ_MIN_SIZE - 1) == "ivf"
    assert resolve_index("auto", AUTO_IVFPQ_MIN_SIZE) == "ivfpq"
    assert resolve_index("auto", AUTO_IVFPQ_MIN_SIZE, gpu=True) == "ivf"
    assert saved_index("auto", AUTO_IVFPQ_MIN_SIZE) == "ivf"  # saved before ivfpq existed
    assert saved_index("auto", AUTO_IVFPQ_MIN_SIZE - 1) == "auto"
    assert saved_index("ivfpq", 100) == "ivfpq"


def test_ivfpq_answers_every_row_even_when_its_candidates_are_fewer_than_k() -> None:
    bank = _patch_like(2000, 8, seed=3)
    distances, indices = MemoryBank(bank, "ivfpq", nprobe=1).search(bank[:50], k=200)
    assert (indices >= 0).all() and np.isfinite(distances).all()
    np.testing.assert_array_equal(indices[:, 0], np.arange(50))  # each row finds itself


def test_ivf_scan_budget_grows_sublinearly_and_leaves_smaller_banks_as_before() -> None:
    from common.engine.memory_bank import IVF_SCAN_BUDGET, default_nlist, default_nprobe

    def scanned(size: int) -> float:
        """Distances one query computes: every centroid, then the vectors of the probed lists."""
        nlist = default_nlist(size)
        return nlist + default_nprobe(nlist, size) * size / nlist

    for size in (8192, 8 * IVF_SCAN_BUDGET):  # up to 8 x the budget: 1/8 of the lists, as before
        nlist = default_nlist(size)
        assert default_nprobe(nlist, size) == max(8, nlist // 8)
    for size in (50_000, 200_000, 1_000_000):
        assert scanned(4 * size) < 2.2 * scanned(size)  # ~sqrt(N), not N: 4x bank, ~2x work
        assert scanned(size) < size / 8
    assert scanned(1_000_000) < 0.01 * 1_000_000


def test_auto_index_on_a_large_bank_finds_the_exact_nearest_within_tolerance() -> None:
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((512, 16)) * 3
    vectors = centres[rng.integers(0, 512, 60_000)] + rng.standard_normal((60_000, 16))
    bank_rows, queries = vectors[:59_000].astype(np.float32), vectors[59_000:].astype(np.float32)
    approximate = MemoryBank(bank_rows)
    assert approximate.index_type == "ivf"
    found = approximate.search(queries, k=1)[0][:, 0]
    exact = MemoryBank(bank_rows, "flat").search(queries, k=1)[0][:, 0]
    assert np.mean(np.isclose(found, exact, rtol=1e-4)) >= 0.99
    # Image scores (max patch distance) of 40 "images" of 25 patches each within 1%.
    np.testing.assert_allclose(
        found.reshape(40, 25).max(axis=1), exact.reshape(40, 25).max(axis=1), rtol=0.01
    )
