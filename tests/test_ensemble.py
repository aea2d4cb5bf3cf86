"""Ensembles: each member's scores normalised by its own held-out normals before averaging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.batches import decode_batch
from common.data.layouts import ImageRecord, discover
from common.engine.ensemble import (
    Ensemble,
    EnsembleError,
    EnsembleFit,
    combine_members,
    fit_ensemble,
    load_ensemble,
    save_ensemble,
)
from common.engine.fit import score_records
from common.engine.normalise import Normaliser
from common.engine.patchcore import PatchCore, PatchCoreConfig
from tests.synthetic import make_seed_layout, make_texture, save

MEMBERS = (
    PatchCoreConfig(image_size=64, coreset_ratio=0.25, scorer="patch"),
    PatchCoreConfig(image_size=96, layers=("stage2", "stage3"), coreset_ratio=0.25),
)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[EnsembleFit, list[Path]]:
    root = tmp_path_factory.mktemp("ensemble")
    make_seed_layout(root, "tex", n_good=16, n_bad=4, n_test=6, size=96)
    records = discover(root)
    fit = fit_ensemble(records, MEMBERS, holdout=0.25, device="cpu", progress=False)
    return fit, [r.path for r in records if r.split == "test"]


def test_members_are_put_on_a_comparable_scale(fitted, tmp_path: Path) -> None:
    fit, _ = fitted
    unseen = [
        ImageRecord(save(make_texture(96, 3000 + i), tmp_path / f"{i}.png"), "tex", "test", 0)
        for i in range(8)
    ]
    members = fit.ensemble.members
    raw = [score_records(m, unseen, 16, False, "")[0][:, 0] for m in members]
    # Raw s* of the two members live on different scales ...
    medians = sorted(float(np.median(r)) for r in raw)
    assert medians[1] > 1.2 * medians[0]
    # ... normalised by each member's own held-out normals, unseen normals land near 0 for both.
    for member, scores in zip(members, raw, strict=True):
        z = Normaliser.from_scores(_held_out_patch_scores(member))(scores)
        assert abs(float(np.median(z))) < 2.5


def _held_out_patch_scores(member: PatchCore) -> np.ndarray:
    parts = member.part_calibration
    return parts[:, 0] if len(parts) else member.calibration


def test_ensemble_score_is_the_mean_of_member_z_scores(fitted) -> None:
    fit, test_paths = fitted
    ensemble = fit.ensemble
    batch = decode_batch(test_paths, ensemble.preprocessing).tensor
    result = ensemble.score_tensors(batch)
    assert ensemble.preprocessing.image_size == 96
    assert result.patch_maps.shape == (len(test_paths), 8, 8)  # the first member's grid
    members = [m.score_tensors(_resized(m, test_paths)).image_scores for m in ensemble.members]
    expected = combine_members(members, [m.calibration for m in ensemble.members])
    np.testing.assert_allclose(result.image_scores, expected, atol=0.3)
    assert fit.validation["auroc"] >= 0.9


def _resized(member, paths):
    return decode_batch(paths, member.preprocessing).tensor


def test_ensemble_file_round_trip(fitted) -> None:
    fit, test_paths = fitted
    loaded = load_ensemble(save_ensemble(fit.ensemble, "tex", fit.validation), device="cpu")
    batch = decode_batch(test_paths, loaded.preprocessing).tensor
    np.testing.assert_allclose(
        loaded.score_tensors(batch).image_scores,
        fit.ensemble.score_tensors(batch).image_scores,
        rtol=1e-4,
        atol=1e-4,
    )
    with pytest.raises(EnsembleError, match="corrupt"):
        load_ensemble(b"junk")


def test_an_ensemble_needs_two_members(fitted) -> None:
    with pytest.raises(EnsembleError, match="at least 2"):
        Ensemble(fitted[0].ensemble.members[:1])
