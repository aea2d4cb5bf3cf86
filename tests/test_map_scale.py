"""Anomaly maps are coloured in patch distances against the held-out normals, not image scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session

from aggregator.category_data import image_files, load_category, score_name
from aggregator.evaluation import evaluate_category
from aggregator.plots import MAP_COLOURS, NORMAL_QUANTILE, map_scale, top_anomalies
from aggregator.thresholds import parse_policy
from common.data.images import Preprocessing
from common.engine.artifact import read_artifact
from common.engine.model_file import ModelReference, held_out_patch_maxima
from common.store.connection import make_engine
from tests.aggregate_data import ScoredCategory, populate

MAXIMA = np.array([2.0, 2.5, 3.0, 3.5, 4.0])


def test_scale_tops_normal_at_the_held_out_normals_quantile() -> None:
    scale = map_scale(MAXIMA, [np.full((4, 4), 100.0)])
    assert scale.normal_top == pytest.approx(np.quantile(MAXIMA, NORMAL_QUANTILE))
    assert scale.hottest == pytest.approx(2 * scale.normal_top)
    assert "35 held-out normal images" in map_scale(np.full(35, 2.0), []).reference
    norm = scale.norm()
    # 0 is the coldest colour, the top of normal the middle, twice it the hottest.
    assert norm(0.0) == pytest.approx(0.0)
    assert norm(scale.normal_top) == pytest.approx(0.5)
    assert norm(scale.hottest) == pytest.approx(1.0)
    assert norm(MAXIMA.min()) < 0.5  # a typical normal image's worst patch stays cool


def test_normal_stays_see_through_blue_and_beyond_normal_turns_warm() -> None:
    """What a reader sees: the image itself under normal patches, yellow-red past the top."""
    scale = map_scale(MAXIMA, [])
    norm = scale.norm()
    for distance in (0.0, 0.5 * scale.normal_top, 0.99 * scale.normal_top):
        red, _, blue, alpha = MAP_COLOURS(norm(distance))
        assert blue > red and alpha <= 0.3
    for distance in (1.01 * scale.normal_top, 1.5 * scale.normal_top, 10 * scale.normal_top):
        red, _, blue, alpha = MAP_COLOURS(norm(distance))
        assert red > 0.75 and blue < 0.1 and alpha >= 0.55


def test_scale_is_the_same_whatever_images_are_shown() -> None:
    """One scale per category: the shown maps (and the image scores) never move it."""
    quiet = map_scale(MAXIMA, [np.full((4, 4), 0.1)])
    loud = map_scale(MAXIMA, [np.full((4, 4), 50.0), np.full((4, 4), -3.0)])
    assert quiet == loud


def test_non_finite_normals_are_ignored() -> None:
    scale = map_scale(np.r_[MAXIMA, np.nan, np.inf], [])
    assert scale.normal_top == pytest.approx(np.quantile(MAXIMA, NORMAL_QUANTILE))


def test_without_held_out_normals_the_scale_says_it_is_relative() -> None:
    scale = map_scale(np.empty(0), [np.full((4, 4), 1.0), np.full((4, 4), 6.0)])
    assert scale.hottest == pytest.approx(6.0)
    assert "no held-out normals" in scale.reference


def test_patch_distance_reference_comes_from_raw_s_star_not_the_fused_score() -> None:
    parts = np.array([[3.0, 10.0, 1.0], [4.0, 11.0, 2.0]], np.float32)
    fused = held_out_patch_maxima(parts, np.array([-0.5, 0.5], np.float32), "fused")
    assert fused == pytest.approx([3.0, 4.0])
    version_1 = held_out_patch_maxima(None, np.array([5.0, 6.0], np.float32), "patch")
    assert version_1 == pytest.approx([5.0, 6.0])
    no_holdout = held_out_patch_maxima(np.empty((0, 3), np.float32), np.empty(0), "fused")
    assert len(no_holdout) == 0


@pytest.mark.parametrize(
    ("scorer", "neighbors", "expected"),
    [
        ("fused", 1, "fused image score"),
        ("patch", 1, "max patch distance (s*)"),
        ("patch", 3, "reweighted max patch distance"),
        ("global", 1, "Mahalanobis"),
    ],
)
def test_score_name_follows_the_models_scorer(scorer: str, neighbors: int, expected: str) -> None:
    empty = np.empty(0)
    model = ModelReference(empty, empty, Preprocessing(), False, scorer, "min-p", neighbors)
    assert expected in score_name(model)


def test_real_run_maps_normal_cool_and_defects_warm(
    tmp_path: Path, dataset: dict[str, ScoredCategory]
) -> None:
    """On a real fitted run: test/good maps below the hottest colour, defects above the top of
    normal."""
    engine = make_engine(f"sqlite:///{tmp_path / 'patchq.db'}")
    run_id = populate(engine, dataset)
    with Session(engine) as session:
        data = load_category(session, run_id, "tex")
        files = image_files(session, data.image_ids.tolist())
    engine.dispose()
    tex = dataset["tex"]
    parts = read_artifact(tex.artifact).part_calibration
    assert parts is not None and data.normal_patch_maxima == pytest.approx(parts[:, 0])
    assert "fused" in data.score_name
    scale = map_scale(data.normal_patch_maxima, [])
    labels = np.array([r.label for r in tex.records])
    splits = np.array([r.split for r in tex.records])
    peaks = tex.patch_maps.reshape(len(labels), -1).max(axis=1)
    test_good = peaks[(labels == 0) & (splits == "test")]
    defects = peaks[labels == 1]
    # No normal map saturates, and most defects sit in the warm half. (Not "most normals below
    # the top of normal": with 3 held-out normals a new one exceeds their p99 with chance 1/4,
    # and 4 or more of 6 did so on one machine's arithmetic.)
    assert test_good.max() < scale.hottest
    assert np.median(defects) > scale.normal_top
    result = evaluate_category(data, parse_policy("youden"))
    by_path = {str(r.path): m for r, m in zip(tex.records, tex.patch_maps, strict=True)}
    maps = {image_id: by_path[image.path] for image_id, image in files.items()}
    png = top_anomalies(result, maps, files, tmp_path / "top.png")
    assert png is not None and png.stat().st_size > 0
