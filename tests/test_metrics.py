"""Image and pixel metrics against hand-computed cases, and their edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.metrics import MetricsError, ranking_metrics, report_text, threshold_metrics
from aggregator.pixel_metrics import aupro, pixel_metrics

LABELS = np.array([0, 0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.3])


def test_ranking_metrics_match_hand_count() -> None:
    # 6 (anomalous, normal) pairs; 0.8 beats all 3 normals, 0.3 beats only 0.1: 4/6.
    result = ranking_metrics(LABELS, SCORES)
    assert result.auroc == pytest.approx(4 / 6)
    # Ranked: 0.8 (tp), 0.4, 0.35, 0.3 (tp): AP = 1/2 * 1 + 1/2 * 2/4.
    assert result.average_precision == pytest.approx(0.75)
    assert result.undefined_reason is None


def test_threshold_metrics_match_confusion_matrix() -> None:
    m = threshold_metrics(LABELS, SCORES, threshold=0.35)
    # flagged: 0.4, 0.35 (normals) and 0.8 (anomalous); 0.3 is missed.
    assert (m.tn, m.fp, m.fn, m.tp) == (1, 2, 1, 1)
    assert m.precision == pytest.approx(1 / 3)
    assert m.recall == pytest.approx(1 / 2)
    assert m.specificity == pytest.approx(1 / 3)
    assert m.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert m.accuracy == pytest.approx(2 / 5)
    assert m.balanced_accuracy == pytest.approx((1 / 2 + 1 / 3) / 2)
    expected_mcc = (1 * 1 - 2 * 1) / np.sqrt(3 * 2 * 3 * 2)
    assert m.mcc == pytest.approx(expected_mcc)
    assert m.confusion.tolist() == [[1, 2], [1, 1]]
    assert "anomalous" in report_text(LABELS, SCORES, 0.35)


def test_one_class_is_undefined_with_a_reason_not_a_crash() -> None:
    result = ranking_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]))
    assert result.auroc is None and result.average_precision is None
    assert "only normal images (4)" in result.undefined_reason
    m = threshold_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), 0.25)
    assert m.recall is None and m.precision is not None and m.balanced_accuracy is None
    assert m.specificity == pytest.approx(0.5)
    assert ranking_metrics(np.ones(2), np.array([1.0, 2.0])).undefined_reason.startswith(
        "only anomalous"
    )


def test_all_scores_equal_is_chance_level() -> None:
    scores = np.full(4, 0.5)
    assert ranking_metrics(np.array([0, 0, 1, 1]), scores).auroc == pytest.approx(0.5)
    m = threshold_metrics(np.array([0, 0, 1, 1]), scores, 0.5)
    assert (m.tp, m.fp) == (2, 2) and m.mcc == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_scores_are_a_clear_error(bad: float) -> None:
    with pytest.raises(MetricsError, match="1 of 3 scores are NaN or infinite"):
        ranking_metrics(np.array([0, 1, 1]), np.array([0.1, bad, 0.3]))


def test_labels_must_be_binary_and_match() -> None:
    with pytest.raises(MetricsError, match="0 \\(normal\\) or 1"):
        ranking_metrics(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(MetricsError, match="labels for 3 scores"):
        threshold_metrics(np.array([0, 1]), np.array([0.1, 0.2, 0.3]), 0.2)


def test_pixel_metrics_perfect_map() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 2:4] = 255
    mask[6, 6] = 255
    result = pixel_metrics([mask / 255.0, np.zeros((8, 8))], [mask, np.zeros((8, 8))])
    assert result.pixel_auroc == pytest.approx(1.0)
    assert result.aupro == pytest.approx(1.0)
    assert result.n_images == 2


def test_aupro_weights_regions_equally() -> None:
    # Region A (4 px) fully found, region B (1 px) scored like the background: at thresholds
    # above the background PRO is 1/2 with FPR 0; then FPR jumps to 1 and PRO to 1.
    mask = np.zeros((4, 4), np.uint8)
    mask[0:2, 0:2] = 1
    mask[3, 3] = 1
    anomaly = np.zeros((4, 4))
    anomaly[0:2, 0:2] = 1.0
    # Curve (0, 0) -> (0, 0.5) -> (1, 1); up to FPR 0.3: area 0.3 * (0.5 + 0.65) / 2.
    assert aupro([anomaly], [mask]) == pytest.approx((0.5 + 0.65) / 2)
    # Pixel AUROC: 4 of 5 defect pixels rank above all 11 normals, one ties with all of them.
    expected = (4 * 11 + 0.5 * 11) / (5 * 11)
    assert pixel_metrics([anomaly], [mask]).pixel_auroc == pytest.approx(expected)


def test_pixel_metrics_without_defect_pixels_is_undefined() -> None:
    result = pixel_metrics([np.ones((4, 4))], [np.zeros((4, 4))])
    assert result.pixel_auroc is None and "no defect pixels" in result.undefined_reason
    with pytest.raises(MetricsError, match="differ in size"):
        pixel_metrics([np.ones((4, 4))], [np.zeros((4, 5))])
