"""Coreset: covers every cluster, beats random coverage, matches plain greedy, validates input;
chunked selection holds one chunk at a time and covers nearly as well as greedy over all rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import common.engine.coreset as coreset
from common.engine.coreset import (
    ApproximateGreedyCoresetSampler,
    ChunkedSelection,
    CoresetError,
    RandomSubsampler,
    coverage_radius,
)
from common.errors import PatchqError


def _clusters(
    sizes: list[int], dim: int = 16, spread: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Tight Gaussian clusters around centres ~10 apart; returns (points, cluster label)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim)) * 10
    labels = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[labels] + rng.standard_normal((len(labels), dim)) * spread
    return points.astype(np.float32), labels


def _plain_greedy(points: np.ndarray, first: int, count: int) -> np.ndarray:
    """Alg. 1 as written: one full distance update per centre (float64 reference)."""
    data = points.astype(np.float64)
    nearest = ((data - data[first]) ** 2).sum(1)
    chosen = [first]
    for _ in range(count - 1):
        chosen.append(int(np.argmax(nearest)))
        nearest = np.minimum(nearest, ((data - data[chosen[-1]]) ** 2).sum(1))
    return np.asarray(chosen)


def test_coreset_has_a_point_in_every_cluster_even_small_ones() -> None:
    points, labels = _clusters([400, 300, 5, 3, 200, 2, 90], dim=300)
    picked = ApproximateGreedyCoresetSampler(ratio=0.01, projection_dim=32).sample(points)
    assert len(picked) == 10
    assert set(labels[picked]) == set(labels)


def test_coverage_radius_beats_random_subsample_of_same_size() -> None:
    points, _ = _clusters([600, 300, 50, 20, 10, 10, 5, 5], spread=0.5)
    greedy = ApproximateGreedyCoresetSampler(ratio=0.02, projection_dim=8).sample(points)
    randomly = RandomSubsampler(len(greedy)).sample(points)
    assert coverage_radius(points, greedy) < 0.5 * coverage_radius(points, randomly)


@pytest.mark.parametrize("candidates", [4, 2048])
def test_lazy_evaluation_picks_what_plain_greedy_picks(
    monkeypatch: pytest.MonkeyPatch, candidates: int
) -> None:
    monkeypatch.setattr(coreset, "_CANDIDATES", candidates)  # 4 forces many full passes
    points = np.random.default_rng(1).standard_normal((500, 6)).astype(np.float32)
    picked = ApproximateGreedyCoresetSampler(ratio=0.2, projection_dim=6).sample(points)
    np.testing.assert_array_equal(picked, _plain_greedy(points, int(picked[0]), len(picked)))


def test_projection_is_applied_above_projection_dim_and_stays_close_to_exact() -> None:
    points, _ = _clusters([50] * 20, dim=64, spread=1.0)
    approx = ApproximateGreedyCoresetSampler(ratio=0.1, projection_dim=16).sample(points)
    exact = ApproximateGreedyCoresetSampler(ratio=0.1, projection_dim=64).sample(points)
    assert coverage_radius(points, approx) <= 1.5 * coverage_radius(points, exact)


def test_deterministic_for_a_seed_unique_and_sized() -> None:
    points = np.random.default_rng(2).standard_normal((1001, 40)).astype(np.float32)
    first = ApproximateGreedyCoresetSampler(ratio=0.1, projection_dim=8, seed=3).sample(points)
    again = ApproximateGreedyCoresetSampler(ratio=0.1, projection_dim=8, seed=3).sample(points)
    other = ApproximateGreedyCoresetSampler(ratio=0.1, projection_dim=8, seed=4).sample(points)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.dtype == np.int64 and len(first) == 101 and len(np.unique(first)) == 101


def test_duplicates_and_full_ratio_still_give_unique_indices() -> None:
    points = np.repeat(np.eye(3, dtype=np.float32), 4, axis=0)  # 3 distinct rows, 12 in all
    picked = ApproximateGreedyCoresetSampler(ratio=1.0).sample(points)
    assert sorted(picked.tolist()) == list(range(12))
    assert len(ApproximateGreedyCoresetSampler(ratio=0.01).sample(points)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_picks_what_cpu_picks() -> None:
    points, _ = _clusters([100] * 10, dim=32, spread=1.0)
    cpu = ApproximateGreedyCoresetSampler(ratio=0.05).sample(points)
    gpu = ApproximateGreedyCoresetSampler(ratio=0.05, device="cuda").sample(points)
    assert coverage_radius(points, gpu) <= 1.05 * coverage_radius(points, cpu)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"ratio": 0.0}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"projection_dim": 0}, "projection_dim"),
    ],
)
def test_bad_settings_are_one_line_patchq_errors(kwargs: dict, fragment: str) -> None:
    with pytest.raises(PatchqError, match=fragment) as caught:
        ApproximateGreedyCoresetSampler(**kwargs)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "features",
    [
        np.zeros((0, 4), np.float32),
        np.zeros(5, np.float32),
        np.zeros((3, 2), np.int64),
        np.array([[0.0, np.nan]], np.float32),
    ],
)
def test_bad_features_are_rejected(features: np.ndarray) -> None:
    with pytest.raises(CoresetError):
        ApproximateGreedyCoresetSampler().sample(features)


def test_random_subsampler_caps_and_keeps_small_sets_whole() -> None:
    points = np.zeros((50, 3), np.float32)
    capped = RandomSubsampler(20, seed=1).sample(points)
    assert len(np.unique(capped)) == 20 and capped.max() < 50
    np.testing.assert_array_equal(capped, RandomSubsampler(20, seed=1).sample(points))
    np.testing.assert_array_equal(RandomSubsampler(80).sample(points), np.arange(50))
    with pytest.raises(CoresetError):
        RandomSubsampler(0)


def test_coverage_radius_is_the_worst_nearest_distance() -> None:
    points = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    assert coverage_radius(points, np.array([0])) == pytest.approx(5.0)
    assert coverage_radius(points, np.array([0, 1])) == pytest.approx(2.0)
    with pytest.raises(CoresetError):
        coverage_radius(points, np.array([4]))


def _streamed(selection: ChunkedSelection, points: np.ndarray, batch: int) -> np.ndarray:
    """Feed ``points`` in batches with their row numbers as payload; the kept row numbers."""
    for start in range(0, len(points), batch):
        stop = min(start + batch, len(points))
        selection.add(points[start:stop], np.arange(start, stop))
    rows, kept = selection.result()
    np.testing.assert_array_equal(rows, points[kept])  # payload travels with its row
    return kept


@pytest.mark.parametrize("chunk_rows", [None, 1000, 1100])
def test_one_chunk_keeps_exactly_what_the_sampler_keeps_of_all_rows(chunk_rows: int | None) -> None:
    # 1000 rows reach chunk_rows 1000 with the last batch, so that is still one chunk.
    points = np.random.default_rng(5).standard_normal((1000, 12)).astype(np.float32)
    sampler = ApproximateGreedyCoresetSampler(ratio=0.1, projection_dim=8, seed=2)
    kept = _streamed(ChunkedSelection(sampler.sample, chunk_rows), points, batch=96)
    np.testing.assert_array_equal(kept, sampler.sample(points))


# The stated bound on the chunked coreset's coverage radius over exact greedy's (measured 1.10
# here; a random subsample of the same size: 7.7). A chunk's greedy covers its own rows, so the
# union's radius is at most the worst chunk's, each chunk having ratio * chunk picks.
CHUNKED_RADIUS_FACTOR = 1.5


def test_chunked_coreset_holds_one_chunk_and_covers_within_a_factor_of_exact() -> None:
    points, _ = _clusters([400, 300, 200, 100, 50, 20, 10, 5] * 5, dim=24, spread=1.0)
    points = points[np.random.default_rng(4).permutation(len(points))]
    sampler = ApproximateGreedyCoresetSampler(ratio=0.05, projection_dim=24)
    seen: list[int] = []

    def select(rows: np.ndarray) -> np.ndarray:
        seen.append(len(rows))
        return sampler.sample(rows)

    kept = _streamed(ChunkedSelection(select, chunk_rows=1000), points, batch=128)
    assert len(seen) == 6 and max(seen) < 1000 + 128 and sum(seen) == len(points)
    assert len(np.unique(kept)) == len(kept) == sum(int(np.ceil(0.05 * n)) for n in seen)
    exact = coverage_radius(points, sampler.sample(points))
    assert coverage_radius(points, kept) <= CHUNKED_RADIUS_FACTOR * exact
    randomly = RandomSubsampler(len(kept)).sample(points)
    assert coverage_radius(points, randomly) > 3 * CHUNKED_RADIUS_FACTOR * exact


def test_chunked_selection_rejects_bad_input() -> None:
    with pytest.raises(CoresetError, match="chunk_rows"):
        ChunkedSelection(np.arange, 0)
    selection = ChunkedSelection(np.arange, None)
    with pytest.raises(CoresetError, match="payload"):
        selection.add(np.zeros((3, 2), np.float32), np.zeros(2))
    with pytest.raises(CoresetError, match="no rows"):
        selection.result()
