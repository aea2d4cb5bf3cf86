"""Threshold policies: parsing with clear errors, and chosen values on hand-checked data."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.thresholds import Policy, PolicyError, choose_threshold, parse_policy

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("youden", Policy("youden")),
        ("MAX_F1", Policy("max_f1")),
        ("target_recall:0.9", Policy("target_recall", 0.9)),
        ("target_precision:1", Policy("target_precision", 1.0)),
        ("normal_quantile:0.99", Policy("normal_quantile", 0.99)),
        ("contamination:5", Policy("contamination", 5.0)),
        ("screening", Policy("target_recall", 0.95, "screening")),
        ("final", Policy("target_precision", 0.9, "final")),
        ("critical", Policy("target_recall", 0.99, "critical")),
    ],
)
def test_parse_policy(text: str, expected: Policy) -> None:
    assert parse_policy(text) == expected


def test_policy_names_are_canonical() -> None:
    assert parse_policy("target_recall:0.950").name == "target_recall:0.95"
    assert parse_policy("screening").label == "screening (target_recall:0.95)"
    for text in ("screening", "contamination:2.5", "youden", "normal_quantile:0.99"):
        assert parse_policy(parse_policy(text).name) == parse_policy(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("otsu", "unknown threshold policy 'otsu'; use youden, max_f1"),
        ("target_recall", "needs a number, e.g. target_recall:0.95"),
        ("target_recall:abc", "needs a number"),
        ("target_recall:1.5", r"must be in \(0, 1\], got 1.5"),
        ("normal_quantile:1", r"must be in \(0, 1\)"),
        ("contamination:0", r"must be in \(0, 100\)"),
        ("youden:3", "takes no parameter"),
        ("__import__('os')", "unknown threshold policy"),
        ("target_recall:nan", "must be in"),
    ],
)
def test_bad_policies_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)


def test_youden_picks_max_tpr_minus_fpr() -> None:
    # At 0.5: TPR 1, FPR 1/4 (0.6) -> J 0.75, the best; at 0.7: TPR 0.75, FPR 0 -> 0.75 too;
    # roc_curve visits the higher threshold first, and argmax keeps the first maximum.
    value = choose_threshold(parse_policy("youden"), SCORES, LABELS).value
    assert value in (0.5, 0.7)


def test_max_f1() -> None:
    # At 0.5: tp 4, fp 1 -> F1 = 8/9, the best (0.7: tp 3, fp 0 -> 6/7).
    assert choose_threshold(parse_policy("max_f1"), SCORES, LABELS).value == 0.5


def test_target_recall_is_the_highest_threshold_meeting_it() -> None:
    assert choose_threshold(parse_policy("target_recall:0.75"), SCORES, LABELS).value == 0.7
    assert choose_threshold(parse_policy("target_recall:0.76"), SCORES, LABELS).value == 0.5
    assert choose_threshold(parse_policy("screening"), SCORES, LABELS).value == 0.5


def test_target_precision_maximises_recall_subject_to_it() -> None:
    assert choose_threshold(parse_policy("target_precision:1"), SCORES, LABELS).value == 0.7
    assert choose_threshold(parse_policy("target_precision:0.8"), SCORES, LABELS).value == 0.5


def test_unreachable_precision_falls_back_with_a_note() -> None:
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    choice = choose_threshold(parse_policy("target_precision:0.95"), scores, labels)
    assert choice.note and "not reached" in choice.note


def test_normal_quantile_uses_held_out_normals_only() -> None:
    normals = np.arange(101, dtype=float)
    choice = choose_threshold(parse_policy("normal_quantile:0.9"), SCORES, None, normals)
    assert choice.value == pytest.approx(90.0)
    with pytest.raises(PolicyError, match="no held-out normal scores; refit"):
        choose_threshold(parse_policy("normal_quantile:0.9"), SCORES, None, np.empty(0))


def test_contamination_flags_that_share_of_unlabelled_scores() -> None:
    scores = np.arange(100, dtype=float)
    value = choose_threshold(parse_policy("contamination:10"), scores).value
    assert np.mean(scores >= value) == pytest.approx(0.1)


def test_labelled_policies_refuse_unlabelled_or_one_class_data() -> None:
    with pytest.raises(PolicyError, match="needs labelled images; use normal_quantile"):
        choose_threshold(parse_policy("youden"), SCORES)
    with pytest.raises(PolicyError, match="only normal images"):
        choose_threshold(parse_policy("max_f1"), SCORES[:4], LABELS[:4])
    with pytest.raises(PolicyError, match="no anomalous images"):
        choose_threshold(parse_policy("target_recall:0.9"), SCORES[:4], LABELS[:4])


def test_all_equal_scores_do_not_crash() -> None:
    scores = np.full(4, 0.5)
    labels = np.array([0, 0, 1, 1])
    for text in ("youden", "max_f1", "target_recall:0.9", "target_precision:0.9"):
        assert np.isfinite(choose_threshold(parse_policy(text), scores, labels).value)
