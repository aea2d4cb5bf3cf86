"""Tail-probability fusion (pure logic): calibrated tails and the tests that combine them."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2

from common.engine.model_config import PatchCoreConfig
from common.engine.normalise import TailModel, fuse_tail
from common.errors import PatchqError

NORMALS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])


def test_below_the_median_the_tail_is_empirical_and_never_zero() -> None:
    tail = TailModel.from_scores(NORMALS)
    # 9 normals: P(score >= 2) counts the 8 normals >= 2, plus one, over 10.
    np.testing.assert_allclose(np.exp(tail.log_p(np.array([2.0, 0.0]))), [0.9, 1.0])


def test_above_the_median_the_tail_is_exponential_with_the_normals_spread() -> None:
    tail = TailModel.from_scores(NORMALS)
    assert tail.threshold == 5.0 and tail.scale == pytest.approx(np.std(NORMALS, ddof=1))
    p_at_u = 6 / 10
    expected = p_at_u * np.exp(-5 / np.std(NORMALS, ddof=1))
    np.testing.assert_allclose(np.exp(tail.log_p(np.array([10.0]))), expected)


def test_models_saved_before_keep_the_mean_excess_scale() -> None:
    tail = TailModel.from_scores(NORMALS, "mean-excess")
    assert tail.scale == pytest.approx(2.5)  # the mean of the excesses 1..4 over the median
    np.testing.assert_allclose(np.exp(tail.log_p(np.array([10.0]))), 6 / 10 * np.exp(-5 / 2.5))
    assert PatchCoreConfig.from_dict({"fusion": "min-p"}).tail_scale == "mean-excess"
    assert PatchCoreConfig().tail_scale == "std"
    with pytest.raises(PatchqError, match="tail scale must be one of std, mean-excess"):
        PatchCoreConfig(tail_scale="iqr")


def test_a_thin_upper_half_does_not_make_a_thin_tail() -> None:
    # Four upper normals close together: their mean excess is small, the spread of all is not.
    normals = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 4.1, 4.2, 4.3, 4.4])
    new = TailModel.from_scores(normals).log_p(np.array([6.0]))[0]
    before = TailModel.from_scores(normals, "mean-excess").log_p(np.array([6.0]))[0]
    assert before < -8 and new > -2  # a new normal at 6 was a one-in-5,000 event; now 1 in 6


def test_scores_beyond_every_normal_keep_their_order() -> None:
    tail = TailModel.from_scores(NORMALS)
    log_p = tail.log_p(np.array([20.0, 200.0, 2000.0, 5.5, 1.5]))
    assert np.all(np.diff(log_p[:3]) < 0)  # no ties at 1/(n+1): defects stay ranked
    assert np.all(log_p <= 0)


def test_identical_normals_still_give_a_usable_tail() -> None:
    tail = TailModel.from_scores(np.full(5, 3.0))
    assert tail.scale > 0
    assert tail.log_p(np.array([4.0]))[0] < tail.log_p(np.array([3.0]))[0]


def test_no_held_out_normals_is_a_clear_error() -> None:
    with pytest.raises(PatchqError, match="held-out normal"):
        TailModel.from_scores(np.empty(0))


def test_min_p_applies_sidak_to_the_smallest_part() -> None:
    p = np.array([[0.2, 0.5], [0.01, 0.5], [0.3, 0.5]])
    fused = fuse_tail(np.log(p), "min-p")
    expected = 1 - (1 - p.min(axis=0)) ** 3
    np.testing.assert_allclose(np.exp(-fused), expected, rtol=1e-5)


def test_min_p_ranks_extreme_parts_without_underflow() -> None:
    log_p = np.array([[-800.0, -900.0, -1.0], [-1.0, -1.0, -1.0]])
    fused = fuse_tail(log_p, "min-p")
    assert np.all(np.isfinite(fused)) and fused[1] > fused[0] > fused[2]


def test_fisher_adds_up_moderate_evidence() -> None:
    p = np.array([[0.05, 0.5], [0.05, 0.01]])
    fused = fuse_tail(np.log(p), "fisher")
    statistic = -2 * np.log(p).sum(axis=0)
    np.testing.assert_allclose(np.exp(-fused), chi2.sf(statistic, 4), rtol=1e-4)
    # Two parts at 0.05 are more surprising together than either alone.
    assert np.exp(-fused[0]) < 0.05


def test_parts_in_any_units_fuse_alike() -> None:
    # A part measured in other units (x100, shifted) gives the same tail, so the same fusion.
    rng = np.random.default_rng(0)
    normals, scores = rng.gamma(2.0, 1.0, 12), np.array([0.5, 3.0, 9.0])
    a = TailModel.from_scores(normals).log_p(scores)
    b = TailModel.from_scores(100 * normals + 7).log_p(100 * scores + 7)
    np.testing.assert_allclose(a, b, atol=1e-9)


def test_unknown_fusion_is_a_clear_error() -> None:
    with pytest.raises(PatchqError, match="tail fusion"):
        fuse_tail(np.zeros((2, 3)), "median")
