"""`patchq run` end to end on the embedded default, and the one-line errors users can hit."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic.layouts import make_mvtec_layout, make_seed_layout
from synthetic.textures import DEFECT_KINDS

ROOT = Path(__file__).parents[1]
SHARED_REDIS = "redis://127.0.0.1:6379/14"  # reachable; nothing is enqueued on it
MODEL_FLAGS = ["--image-size", "64", "--coreset-ratio", "0.25", "--device", "cpu"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    make_seed_layout(folder / "data", "tex", n_good=10, n_bad=4, n_test=6, size=64)
    (folder / "empty").mkdir()
    return folder


def patchq(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `patchq ARGS` in `workdir` with a clean PATCHQ_* environment (no broker)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PATCHQ_")}
    base |= {
        "PYTHONPATH": str(ROOT),
        "PATCHQ_DATABASE_URL": f"sqlite:///{workdir / 'patchq.db'}",
        "PATCHQ_MODEL_CACHE_DIR": str(workdir / "models"),
        "PATCHQ_DEVICE": "cpu",
    }
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        cwd=workdir,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_run_fits_scores_and_aggregates_in_process(workdir: Path) -> None:
    result = patchq(workdir, "run", "data", "--run", "first", "--out", "out", *MODEL_FLAGS)
    assert result.returncode == 0, result.stderr
    assert "fitting tex" in result.stdout and "tex: 20 done, 0 failed, 0 pending" in result.stdout
    assert (workdir / "out" / "index.html").is_file()
    with sqlite3.connect(workdir / "patchq.db") as db:
        assert db.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall() == [
            ("done", 20)
        ]
        assert db.execute("SELECT count(*) FROM scores").fetchone() == (20,)
        (worker,) = db.execute("SELECT DISTINCT worker FROM scores").fetchone()
    assert worker.startswith("inprocess@")

    again = patchq(workdir, "run", "data", "--run", "first", "--out", "out", *MODEL_FLAGS)
    assert again.returncode == 0, again.stderr
    assert "tex: using model 1" in again.stdout and "0 to score" in again.stdout

    status = patchq(workdir, "status", "first")
    assert status.returncode == 0, status.stderr
    assert "20/20" in status.stdout and "tex: 20 done, 0 failed, 0 pending" in status.stdout


def test_unknown_category_is_one_line(workdir: Path) -> None:
    line = _one_line_error(patchq(workdir, "run", "data", "--category", "nope", *MODEL_FLAGS))
    assert "unknown category 'nope'" in line and "tex" in line


def test_no_images_is_one_line(workdir: Path) -> None:
    line = _one_line_error(
        patchq(workdir, "submit", "empty", "--category", "tex", PATCHQ_BROKER_URL="redis://x/0")
    )
    assert "no images" in line


def test_missing_model_says_to_fit_first(workdir: Path) -> None:
    submit = ["submit", "data/tex/test", "--category", "wood"]
    line = _one_line_error(patchq(workdir, *submit, PATCHQ_BROKER_URL=SHARED_REDIS))
    assert "no model for category wood" in line and "patchq fit" in line


def test_submit_without_broker_and_unknown_run_are_one_line(workdir: Path) -> None:
    line = _one_line_error(patchq(workdir, "submit", "data", "--category", "tex"))
    assert "PATCHQ_BROKER_URL is not set" in line and "patchq run" in line
    line = _one_line_error(patchq(workdir, "status", "no-such-run"))
    assert "run 'no-such-run' is not in the database" in line


def test_a_missing_or_folder_answer_key_is_one_line_before_anything_is_scored(
    tmp_path: Path,
) -> None:
    make_seed_layout(tmp_path / "data", "tex", n_good=4, n_bad=2, n_test=2, size=64)
    (tmp_path / "folder").mkdir()
    args = ["run", "data", "--run", "never", *MODEL_FLAGS]
    line = _one_line_error(patchq(tmp_path, *args, "--labels", "no-such.csv"))
    assert "no-such.csv: not found" in line
    line = _one_line_error(patchq(tmp_path, *args, "--labels", "folder"))
    assert "folder: --labels needs a .csv/.txt manifest" in line
    assert not (tmp_path / "patchq.db").exists()  # nothing fitted, registered or scored


def test_unreachable_broker_is_one_line(workdir: Path) -> None:
    down = {"PATCHQ_BROKER_URL": "redis://127.0.0.1:1/0"}
    for args in (["submit", "data", "--category", "tex"], ["run", "data", *MODEL_FLAGS]):
        line = _one_line_error(patchq(workdir, *args, **down))
        assert "cannot reach the broker at redis://127.0.0.1:1/0" in line


def test_critical_parts_ensemble_fits_scores_aggregates_and_reports(tmp_path: Path) -> None:
    # The seed's "critical parts" row: a multi-model ensemble judged at target recall 0.99.
    make_seed_layout(tmp_path / "data", "tex", n_good=10, n_bad=4, n_test=6, size=64)
    members = ["--ensemble-member", "stage3,stage5", "--ensemble-member", "stage2,stage3"]
    fit = patchq(tmp_path, "fit", "--data", "data", *members, *MODEL_FLAGS)
    assert fit.returncode == 0, fit.stderr
    assert "ensemble of 2 members" in fit.stdout
    run = patchq(tmp_path, "run", "data", "--policy", "critical", "--out", "out", *MODEL_FLAGS)
    assert run.returncode == 0, run.stderr
    assert "tex: using model 1" in run.stdout and "tex: 20 done, 0 failed" in run.stdout
    assert "target_recall:0.99" in run.stdout and (tmp_path / "out" / "index.html").is_file()
    with sqlite3.connect(tmp_path / "patchq.db") as db:
        (config,) = db.execute("SELECT config FROM models").fetchone()
        assert db.execute("SELECT count(*) FROM scores").fetchone() == (20,)
    assert "ensemble of 2 members" in config


def test_aggregate_leaves_out_the_images_auto_chose_the_model_on(tmp_path: Path) -> None:
    # Enough held-out normals and labelled defects for --auto's default, which chooses on every
    # one of them (stored with the model): a run that scores them must not count them, while
    # another lot's labelled images, which the choice never saw, count in full.
    make_mvtec_layout(tmp_path / "data", "tex", n_train=16, n_test_good=6, n_per_defect=4)
    run = patchq(tmp_path, "run", "data", "--run", "fit-lot", "--out", "out", *MODEL_FLAGS)
    assert run.returncode == 0, run.stderr
    assert "--auto chose" in run.stdout
    with sqlite3.connect(tmp_path / "patchq.db") as db:
        (validation,) = db.execute("SELECT validation FROM models").fetchone()
        selection = json.loads(validation)["auto"]["selection_paths"]
        test_images = {path for (path,) in db.execute("SELECT path FROM images WHERE split='test'")}
    assert test_images <= set(selection) and set(selection) - test_images  # held-out good too
    left_out = re.search(r"(\d+) left out: `fit --auto` chose the model on them", run.stdout)
    assert left_out and int(left_out.group(1)) == len(test_images)
    make_mvtec_layout(tmp_path / "lot2", "tex", n_train=2, n_test_good=5, n_per_defect=3)
    run = patchq(tmp_path, "run", "lot2", "--run", "lot-2", "--out", "out2", *MODEL_FLAGS)
    assert run.returncode == 0, run.stderr
    assert "left out: `fit --auto`" not in run.stdout
    with sqlite3.connect(tmp_path / "patchq.db") as db:
        assert db.execute("SELECT count(*) FROM models").fetchone() == (1,)  # the same model
    # youden's pool: every labelled test image of the new lot.
    pool = re.search(r"= (\d+) labelled images of the run", run.stdout)
    assert pool and int(pool.group(1)) == 5 + 3 * len(DEFECT_KINDS)


def test_an_answer_key_labels_the_test_images_once_and_they_count(tmp_path: Path) -> None:
    # A seed layout's test/ is unlabelled on disk, so fit never validates on it; an answer key
    # for it is recorded as verdicts, once however often the run is continued, and its images
    # then count in the run's figures.
    make_seed_layout(tmp_path / "data", "tex", n_good=10, n_bad=4, n_test=8, size=64)
    rows = [f"data/tex/test/{i:03d}.png,{i % 2}" for i in range(7)] + ["data/tex/test/007.png,"]
    (tmp_path / "answers.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    args = ["run", "data", "--run", "lot", "--labels", "answers.csv", "--out", "out"]
    run = patchq(tmp_path, *args, *MODEL_FLAGS)
    assert run.returncode == 0, run.stderr
    assert "answer key answers.csv: 7 new labels of 7 recorded as verdicts" in run.stdout
    assert "labels from verdicts: 7" in run.stdout
    pool = re.search(r"= (\d+) labelled images of the run", run.stdout)
    assert pool and int(pool.group(1)) == 4 + 7  # train/bad and the answered test images
    with sqlite3.connect(tmp_path / "patchq.db") as db:
        verdicts = dict(
            db.execute(
                "SELECT i.path, r.verdict FROM reviews r JOIN images i ON i.id = r.image_id"
            ).fetchall()
        )
    assert {Path(p).name: v for p, v in verdicts.items()} == {
        f"{i:03d}.png": "defect" if i % 2 else "normal" for i in range(7)
    }
    again = patchq(tmp_path, *args, *MODEL_FLAGS)
    assert again.returncode == 0, again.stderr
    assert "answer key answers.csv: 0 new labels of 7 recorded" in again.stdout


def test_the_demo_judges_its_models_on_test_cells_by_their_answer_key(tmp_path: Path) -> None:
    args = ["demo", "--root", "demo", "--limit", "40", "--category", "mono", "--out", "out"]
    run = patchq(tmp_path, *args, *MODEL_FLAGS)
    assert run.returncode == 0, run.stderr
    key = re.search(r"answer key demo/mono/test_labels.csv: (\d+) new labels of (\d+)", run.stdout)
    assert key and int(key.group(1)) == int(key.group(2)) > 0
    assert f"labels from verdicts: {key.group(1)}" in run.stdout
