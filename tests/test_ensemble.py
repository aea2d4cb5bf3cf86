"""Ensembles: each member's scores normalised by its own held-out normals before averaging."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from aggregator.category_data import load_category
from common.data.batches import decode_batch
from common.data.layouts import ImageRecord, discover
from common.engine.artifact import artifact_hash
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
from common.engine.model_config import PatchCoreConfig
from common.engine.normalise import Normaliser
from common.engine.patchcore import PatchCore
from common.scoring.batch import score_batch
from common.scoring.context import ScoringContext
from common.scoring.model_cache import ModelProvider
from common.store.image_rows import ImageRow, pending_image_ids, register_images
from common.store.model_rows import store_model
from common.store.run_rows import create_run
from common.store.schema import Score
from producer.cli import main
from synthetic.layouts import make_seed_layout, save
from synthetic.textures import make_texture

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


def test_an_ensemble_is_stored_loaded_and_scored_like_any_model(
    fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    # The fleet's path: the models table -> a worker's ModelProvider -> score_batch -> rows,
    # then aggregation reads the ensemble's held-out normals and input size from the same row.
    fit, test_paths = fitted
    data = save_ensemble(fit.ensemble, "tex", fit.validation)
    with sessions.begin() as session:
        model_id = store_model(
            session, "tex", data, artifact_hash(data), "ensemble", {}, fit.validation, 1
        )
        run_id = create_run(session, "r", "test", batch_size=len(test_paths))
        rows = [ImageRow(category="tex", path=str(p), model_id=model_id) for p in test_paths]
        register_images(session, run_id, rows)
        ids = pending_image_ids(session, run_id)
    provider = ModelProvider(sessions, tmp_path / "cache", device="cpu")
    outcome = score_batch(ScoringContext(sessions, provider, "w1"), run_id, ids)
    assert sorted(outcome.done) == ids and outcome.timings["search_s"] > 0

    batch = decode_batch(test_paths, fit.ensemble.preprocessing).tensor
    expected = fit.ensemble.score_tensors(batch)
    with sessions() as session:
        stored = session.scalars(select(Score.score).order_by(Score.image_id)).all()
        data_for_report = load_category(session, run_id, "tex")
    np.testing.assert_allclose(stored, expected.image_scores, rtol=1e-4, atol=1e-4)
    calibration = data_for_report.held_out_normals
    np.testing.assert_allclose(calibration, fit.ensemble.calibration, rtol=1e-6)
    assert data_for_report.preprocessing == fit.ensemble.preprocessing


def test_fit_update_of_an_ensemble_is_one_line(
    fitted, sessions: sessionmaker[Session], db_url: str, monkeypatch, capsys
) -> None:
    # --update grows one bank; an ensemble has one per member, so it is refitted instead.
    fit, _ = fitted
    data = save_ensemble(fit.ensemble, "tex", fit.validation)
    with sessions.begin() as session:
        model_id = store_model(session, "tex", data, artifact_hash(data), "ensemble", {}, None, 1)
        create_run(session, "r", "test", batch_size=1)
    monkeypatch.setenv("PATCHQ_DATABASE_URL", db_url)
    assert main(["fit", "--update", "tex", "--from-run", "r", "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"model {model_id} of 'tex' is an ensemble" in error
    assert "refit the ensemble" in error
    assert "\n" not in error
