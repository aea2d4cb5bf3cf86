"""The ready queries (docs/queries.sql, shown in docs/sql.md) answer right on SQLite and PostgreSQL.

Rows are written with the same common.store functions the workers use, so a schema change that
breaks a documented query fails here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from common.store.connection import make_session_factory
from common.store.image_rows import ImageRow, mark_failed, pending_image_ids, register_images
from common.store.model_rows import store_model
from common.store.reviews import add_verdict
from common.store.run_rows import create_run
from common.store.score_rows import ScoreRow, upsert_scores

QUERIES_FILE = Path(__file__).parents[1] / "docs" / "queries.sql"
_NAME_MARKER = re.compile(r"-- name: (\w+)")
CATEGORY_SIZES = {"cell": 23, "wafer": 7}  # 23 cells: 20 scored, 3 failed
FAILURES = {20: "not an image", 21: "not an image", 22: "file is missing"}
DURATIONS_MS = {"w1": 10.0, "w2": 40.0}


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """name -> SQL of each `-- name:` block, comment lines dropped.

    Comments are dropped because they mention :parameters, which SQLAlchemy would otherwise
    try to bind.
    """
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        marker = _NAME_MARKER.fullmatch(line.strip())
        if marker:
            current = queries.setdefault(marker[1], [])
        elif current is not None and not line.lstrip().startswith("--"):
            current.append(line)
    return {name: "\n".join(lines).strip() for name, lines in queries.items()}


@dataclass
class Seeded:
    """What was written, so each test can compute the expected answer in Python."""

    run_id: int
    # category -> [(path, score, worker)] of the scored images
    scores: dict[str, list[tuple[str, float, str]]] = field(default_factory=dict)


@pytest.fixture
def seeded(engine: Engine) -> Seeded:
    """One run with scores from two workers and three failures, next to a run it must ignore."""
    rng = np.random.default_rng(7)
    with make_session_factory(engine).begin() as session:
        seeded = _seed_run(session, rng)
        _seed_run(session, rng)  # another run: its rows must not show up
    return seeded


def _seed_run(session: Session, rng: np.random.Generator) -> Seeded:
    """A new run of CATEGORY_SIZES images: FAILURES marked failed, the rest scored."""
    seeded = Seeded(run_id=create_run(session, name=None, source="/data", batch_size=8))
    for category, size in CATEGORY_SIZES.items():
        model_id = store_model(
            session,
            category=category,
            artifact_bytes=category.encode(),
            content_hash=category.encode().hex().ljust(64, "0"),
            backbone="efficientnet_lite0",
            config={},
            validation=None,
            bank_size=10,
        )
        rows: list[ImageRow] = [
            {"category": category, "path": f"/data/{category}/{i:02d}.png", "model_id": model_id}
            for i in range(size)
        ]
        register_images(session, seeded.run_id, rows)
    scored: list[ScoreRow] = []
    reasons: dict[int, str] = {}
    for image_id in pending_image_ids(session, seeded.run_id):
        path = _path_of(session, image_id)
        category, index = path.split("/")[2], int(Path(path).stem)
        if category == "cell" and index in FAILURES:
            reasons[image_id] = f"{path}: {FAILURES[index]}"
            continue
        worker = "w1" if category == "cell" and index % 3 else "w2"
        score = round(float(rng.uniform(0, 10)), 6)
        seeded.scores.setdefault(category, []).append((path, score, worker))
        scored.append(_score_row(seeded.run_id, image_id, score, worker))
    upsert_scores(session, scored)
    mark_failed(session, seeded.run_id, reasons)
    return seeded


def _path_of(session: Session, image_id: int) -> str:
    return session.execute(
        text("SELECT path FROM images WHERE id = :id"), {"id": image_id}
    ).scalar()


def _score_row(run_id: int, image_id: int, score: float, worker: str) -> ScoreRow:
    return {
        "run_id": run_id,
        "image_id": image_id,
        "score": score,
        "patch_map": np.zeros((2, 2), dtype=np.float32),
        "worker": worker,
        "duration_ms": DURATIONS_MS[worker],
    }


def _query(engine: Engine, name: str, **params: object) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        result = connection.execute(text(load_queries()[name]), params)
        return [dict(row._mapping) for row in result]


def test_file_holds_the_documented_queries() -> None:
    assert list(load_queries()) == [
        "top_anomalies",
        "failure_reasons",
        "worker_throughput",
        "score_distribution",
        "review_verdicts",
    ]


def test_top_anomalies_per_category(engine: Engine, seeded: Seeded) -> None:
    rows = _query(engine, "top_anomalies", run_id=seeded.run_id, top_n=3)
    expected = [
        (category, rank, path, pytest.approx(score), worker)
        for category, scored in sorted(seeded.scores.items())
        for rank, (path, score, worker) in enumerate(
            sorted(scored, key=lambda item: -item[1])[:3], start=1
        )
    ]
    assert [
        (r["category"], r["rank_in_category"], r["path"], r["score"], r["worker"]) for r in rows
    ] == expected


def test_failure_reasons_grouped_without_paths(engine: Engine, seeded: Seeded) -> None:
    rows = _query(engine, "failure_reasons", run_id=seeded.run_id)
    assert rows == [
        {
            "category": "cell",
            "reason": "not an image",
            "images": 2,
            "example_path": "/data/cell/20.png",
        },
        {
            "category": "cell",
            "reason": "file is missing",
            "images": 1,
            "example_path": "/data/cell/22.png",
        },
    ]


def test_worker_throughput(engine: Engine, seeded: Seeded) -> None:
    rows = _query(engine, "worker_throughput", run_id=seeded.run_id)
    counts: dict[str, int] = {}
    for scored in seeded.scores.values():
        for _, _, worker in scored:
            counts[worker] = counts.get(worker, 0) + 1
    assert {r["worker"]: r["images"] for r in rows} == counts
    for row in rows:
        busy_s = counts[row["worker"]] * DURATIONS_MS[row["worker"]] / 1000
        assert float(row["busy_s"]) == pytest.approx(busy_s)
        assert float(row["images_per_s"]) == pytest.approx(1000 / DURATIONS_MS[row["worker"]])
        assert str(row["first_scored_at"]) <= str(row["last_scored_at"])


def test_score_distribution_nearest_rank_percentiles(engine: Engine, seeded: Seeded) -> None:
    rows = _query(engine, "score_distribution", run_id=seeded.run_id)
    assert [r["category"] for r in rows] == sorted(seeded.scores)
    for row in rows:
        scores = np.array([score for _, score, _ in seeded.scores[row["category"]]])
        quantile = {
            column: np.percentile(scores, q, method="inverted_cdf")
            for column, q in (("p25", 25), ("median", 50), ("p75", 75), ("p95", 95), ("p99", 99))
        }
        assert row["images"] == len(scores)
        assert row["min_score"] == pytest.approx(scores.min())
        assert row["max_score"] == pytest.approx(scores.max())
        assert float(row["mean_score"]) == pytest.approx(scores.mean())
        assert {column: row[column] for column in quantile} == pytest.approx(quantile)


def test_review_verdicts_latest_wins_with_history(engine: Engine, seeded: Seeded) -> None:
    with make_session_factory(engine).begin() as session:
        first, second = _image_ids(session, seeded.run_id)[:2]
        add_verdict(session, seeded.run_id, first, "defect", "alice")
        add_verdict(session, seeded.run_id, first, "normal", "bob")
        add_verdict(session, seeded.run_id, second, "defect", "alice")
    rows = _query(engine, "review_verdicts", run_id=seeded.run_id)
    assert [(r["path"], r["verdict"], r["reviewer"], r["verdicts"]) for r in rows] == [
        (_image_path(engine, first), "normal", "bob", 2),
        (_image_path(engine, second), "defect", "alice", 1),
    ]


def _image_ids(session: Session, run_id: int) -> list[int]:
    return list(
        session.execute(
            text("SELECT id FROM images WHERE run_id = :run_id ORDER BY id"), {"run_id": run_id}
        ).scalars()
    )


def _image_path(engine: Engine, image_id: int) -> str:
    with Session(engine) as session:
        return _path_of(session, image_id)


def test_docs_show_the_tested_queries() -> None:
    """docs/sql.md's SQL block is docs/queries.sql pasted verbatim; this catches drift."""
    page = (QUERIES_FILE.parent / "sql.md").read_text(encoding="utf-8")
    assert f"```sql\n{QUERIES_FILE.read_text(encoding='utf-8')}```" in page, (
        "docs/sql.md's SQL section is stale: paste docs/queries.sql into its ```sql block"
    )
