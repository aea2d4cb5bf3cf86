"""aggregate_run on a real scored run in SQLite and PostgreSQL: stored rows, CSVs, honesty."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from aggregator import category_data, exports
from aggregator.aggregate import aggregate_run
from common.store import bulk
from common.store.aggregate_schema import Metric, Prediction, Threshold
from common.store.connection import make_engine
from common.store.run_rows import UnknownRunError
from common.store.schema import Score
from producer.cli import main
from tests.aggregate_data import populate


@pytest.fixture
def run(db_url: str, dataset):
    engine = make_engine(db_url)
    yield engine, populate(engine, dataset)
    engine.dispose()


def _rows(engine, table, **where):
    with Session(engine) as session:
        query = select(table).where(*(getattr(table, k) == v for k, v in where.items()))
        return list(session.scalars(query))


def test_default_policy_stores_thresholds_metrics_predictions(run, dataset, tmp_path) -> None:
    engine, run_id = run
    summary = aggregate_run(engine, run_id, out_dir=tmp_path, echo=None)
    assert [r.data.category for r in summary.results] == ["cell", "tex"]

    tex = _rows(engine, Threshold, category="tex")[0]
    assert tex.policy == "youden"
    assert tex.calibration_set.startswith("7 of 14 = 14 labelled images of the run")
    assert tex.evaluation_set == "the other 7 of them"
    assert "12 train/good images left out" in tex.calibration_set
    metric = _rows(engine, Metric, category="tex")[0]
    # Evaluation = the other half of test/good (6) + defects (8): 3 normal + 4 anomalous.
    assert (metric.n_normal, metric.n_anomalous) == (3, 4)
    assert metric.tn + metric.fp + metric.fn + metric.tp == 7
    assert metric.auroc is not None and metric.pixel_auroc > 0.5 and 0 < metric.aupro <= 1
    assert "anomalous" in metric.report

    predictions = _rows(engine, Prediction, category="tex")
    assert len(predictions) == len(dataset["tex"].records) == 26
    roles = [p.role for p in predictions]
    assert roles.count("excluded") == 12 and roles.count("calibration") == 7
    assert all(p.is_anomaly == (p.score >= tex.value) for p in predictions)

    # The seed layout labels only defects: fit's held-out normals stand in for the normal class.
    cell = _rows(engine, Threshold, category="cell")[0]
    assert "3 normal images fit held out of the memory bank" in cell.calibration_set
    cell_roles = [p.role for p in _rows(engine, Prediction, category="cell")]
    assert cell_roles.count("unlabelled") == 4


def test_csv_exports(run, dataset, tmp_path) -> None:
    engine, run_id = run
    summary = aggregate_run(engine, run_id, policy="screening", out_dir=tmp_path, echo=None)
    with summary.category_csvs["cell"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10
    assert list(rows[0]) == ["path", "score", "label", "prediction", "threshold", "policy", "role"]
    assert [float(r["score"]) for r in rows] == sorted(
        (float(r["score"]) for r in rows), reverse=True
    )
    assert {r["label"] for r in rows} == {"", "1"}
    assert all(r["policy"] == "screening" for r in rows)
    threshold = float(rows[0]["threshold"])
    assert all(int(r["prediction"]) == (float(r["score"]) >= threshold) for r in rows)
    with summary.summary_csv.open() as handle:
        summary_rows = list(csv.DictReader(handle))
    assert [r["category"] for r in summary_rows] == ["cell", "tex"]
    assert summary_rows[1]["pixel_auroc"] and summary_rows[0]["pixel_auroc"] == ""


def test_reaggregating_replaces_and_policies_accumulate(run, tmp_path) -> None:
    engine, run_id = run
    for policy in ("youden", "youden", "contamination:20"):
        aggregate_run(engine, run_id, policy=policy, out_dir=tmp_path, echo=None)
    with Session(engine) as session:
        counts = dict(
            session.execute(
                select(Prediction.policy, func.count()).group_by(Prediction.policy)
            ).all()
        )
    assert counts == {"youden": 36, "contamination:20": 36}
    assert len(_rows(engine, Metric)) == 4


def test_normal_quantile_uses_fit_held_out_scores(run, dataset, tmp_path) -> None:
    engine, run_id = run
    summary = aggregate_run(engine, run_id, "normal_quantile:0.9", tmp_path, echo=None)
    tex = next(r for r in summary.results if r.data.category == "tex")
    expected = np.quantile(dataset["tex"].calibration.astype(np.float64), 0.9)
    assert tex.choice.value == pytest.approx(expected)
    assert "held out of the memory bank" in tex.sets.calibration_set
    assert tex.sets.evaluation_set.startswith("14 labelled images of the run (")


def test_unknown_run_is_a_clear_error(run, tmp_path) -> None:
    engine, _ = run
    with pytest.raises(UnknownRunError, match="run 'nope' is not in the database"):
        aggregate_run(engine, "nope", out_dir=tmp_path, echo=None)


def test_cli_aggregate(run, db_url, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATCHQ_DATABASE_URL", db_url)
    assert main(["aggregate", "r1", "--policy", "final", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "calibration (threshold chosen on)" in out and "summary" in out
    assert "final (target_precision:0.9)" in out
    assert main(["aggregate", "r1", "--policy", "otsu"]) == 2
    assert "error: unknown threshold policy 'otsu'" in capsys.readouterr().err


def test_streaming_in_small_chunks_gives_the_same_results(run, tmp_path, monkeypatch) -> None:
    """Reads, prediction writes and CSV rows cross chunk boundaries without changing a thing."""
    engine, run_id = run

    def outcome(out):
        summary = aggregate_run(engine, run_id, policy="max_f1", out_dir=out, echo=None)
        files = {c: path.read_text() for c, path in summary.category_csvs.items()}
        predictions = [
            (p.image_id, p.category, p.score, p.is_anomaly, p.role)
            for p in sorted(_rows(engine, Prediction), key=lambda p: p.image_id)
        ]
        return files, predictions, summary.summary_csv.read_text()

    whole = outcome(tmp_path / "whole")
    monkeypatch.setattr(category_data, "READ_CHUNK_ROWS", 3)
    monkeypatch.setattr(bulk, "SQLITE_CHUNK_ROWS", 4)
    monkeypatch.setattr(exports, "STREAM_ROWS", 5)
    chunked = outcome(tmp_path / "chunked")
    assert chunked == whole
    assert len(whole[1]) == len(_rows(engine, Score))  # every scored image, once
