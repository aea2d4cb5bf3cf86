"""`fit --update` on a model with the default fused scorer: the whole-image parts learn the
reviewed false alarms as exemplars, beside the bank's new patches.

The data (synthetic/layouts.py make_review_layout) holds normal images carrying a new, acceptable
mark the training images lack: a large coloured square that moves every part of the score (the
patches under it, the pooled feature statistics and the pixel colour means), among real
defects. Verdicts are written as the review page writes them (its browser test is
tests/test_review.py); here the subject is what the update does to the scores.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.engine.artifact import load_artifact
from common.store.connection import make_engine
from common.store.model_rows import load_model_bytes
from common.store.reviews import add_verdict
from common.store.schema import Image, Model, Run
from common.store.threshold_queries import category_threshold
from producer.cli import main
from producer.fit_update import reviewed_images
from synthetic.layouts import make_review_layout
from tests.update_scores import update_scores

CATEGORY = "tex"


def test_fit_update_teaches_the_fused_model_its_false_alarms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    make_review_layout(tmp_path / "data", CATEGORY, n_good=16, n_variant=10, n_defect=6)
    url = f"sqlite:///{tmp_path / 'patchq.db'}"
    monkeypatch.setenv("PATCHQ_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)
    run = ["run", str(tmp_path / "data"), "--run", "r1", "--image-size", "64"]
    assert main([*run, "--coreset-ratio", "0.25", "--device", "cpu"]) == 0  # default: fused
    engine = make_engine(url)
    try:
        with Session(engine) as session, session.begin():
            run_id = session.scalars(select(Run.id).where(Run.name == "r1")).one()
            old_threshold = category_threshold(session, run_id, CATEGORY)
            old_model_id = session.scalars(select(Image.model_id).distinct()).one()
            for image_id, path in session.execute(
                select(Image.id, Image.path).where(Image.run_id == run_id, Image.split == "test")
            ):
                verdict = "normal" if Path(path).name.startswith("variant") else "defect"
                add_verdict(session, run_id, image_id, verdict, "alice")
        assert old_threshold is not None
        capsys.readouterr()
        assert main(["fit", "--update", CATEGORY, "--from-run", "r1", "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        with Session(engine) as session:
            new_model_id = session.scalars(select(func.max(Model.id))).one()
            before = load_artifact(load_model_bytes(session, old_model_id)[0], "cpu")
            after = load_artifact(load_model_bytes(session, new_model_id)[0], "cpu")
            split = reviewed_images(session, run_id, CATEGORY, holdout=0.2, seed=0)
    finally:
        engine.dispose()
    assert before.config.scorer == "fused" and after.global_scorer is not None
    assert "whole-image exemplars added" in printed and "held-out validation" in printed
    for part in (after.global_scorer, after.pixel_scorer):
        assert part is not None and 1 <= part.n_exemplars <= len(split.update)

    scores, threshold = update_scores(before, after, split), old_threshold.value
    old, new = scores.old, scores.new
    assert all(old[p] >= threshold for p in scores.taught)  # they were false alarms
    assert all(new[p] < threshold for p in scores.taught)  # now below the old threshold
    assert all(new[p] < old[p] for p in scores.held_normal)  # unseen marked images: lower too
    # Held-out defects keep their scores: still flagged, and at most 10% lower.
    assert all(0.9 * old[p] <= new[p] <= old[p] for p in scores.held_defect)
    assert all(new[p] >= threshold for p in scores.held_defect)
