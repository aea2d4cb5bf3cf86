"""Streamed registration and the progress aggregates at scale (issue 12), on both dialects.

A manifest is read as a stream and registered in chunks, one transaction each; these tests
shrink the chunk and page sizes so that a few rows cross every boundary.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from common.data.layouts import LayoutError, iter_archive
from common.store import image_rows
from common.store.image_rows import mark_failed, pending_id_batches, pending_image_ids
from common.store.model_rows import store_model
from common.store.run_rows import CategoryProgress, run_progress
from common.store.schema import Image, Score
from common.store.score_rows import upsert_scores
from producer import submission
from producer.submission import register_run


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(submission, "REGISTER_CHUNK_IMAGES", 3)
    monkeypatch.setattr(image_rows, "PENDING_PAGE_BATCHES", 2)


def _model(sessions: sessionmaker[Session], category: str = "c") -> int:
    with sessions.begin() as session:
        return store_model(session, category, category.encode(), category.ljust(64, "0"),
                           "none", {}, None, 1)  # fmt: skip


def _manifest(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "paths.csv"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _paths(sessions: sessionmaker[Session], run_id: int) -> list[str]:
    with sessions() as session:
        return list(
            session.scalars(select(Image.path).where(Image.run_id == run_id).order_by(Image.id))
        )


def test_stream_registers_each_path_once_in_order_across_chunks(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    _model(sessions)
    names = ["a", "b", "c", "a", "d", "e", "b", "f", "g", "h"]  # repeats in and across chunks
    manifest = _manifest(
        tmp_path, ["path,label", *(f"{n}.png,{i % 2}" for i, n in enumerate(names))]
    )
    first = register_run(sessions, iter_archive(manifest, "c"), "r", "m", 4)
    assert (first.added, first.pending) == (8, 8)
    expected = [str(tmp_path / f"{n}.png") for n in "abcdefgh"]
    assert _paths(sessions, first.run_id) == expected
    with sessions() as session:
        labels = {path: label for path, label in session.execute(select(Image.path, Image.label))}
    assert labels[str(tmp_path / "d.png")] == 0 and labels[str(tmp_path / "b.png")] == 1

    again = register_run(sessions, iter_archive(manifest, "c"), "r", "m", 4)
    assert (again.run_id, again.added, again.pending) == (first.run_id, 0, 8)
    assert _paths(sessions, first.run_id) == expected


def test_bad_line_is_named_and_resubmitting_the_fixed_manifest_completes_the_run(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    _model(sessions)
    lines = [f"{i}.png,good" for i in range(7)]
    manifest = _manifest(tmp_path, [*lines, "7.png,maybe", "8.png,bad"])
    with pytest.raises(LayoutError, match=r"paths.csv:8: label 'maybe' is not 0/1/good/bad"):
        register_run(sessions, iter_archive(manifest, "c"), "r", "m", 4)
    with sessions() as session:  # whole chunks before the bad line were kept
        assert session.scalar(select(Image.run_id).limit(1)) is not None
    manifest = _manifest(tmp_path, [*lines, "7.png,bad", "8.png,bad"])
    done = register_run(sessions, iter_archive(manifest, "c"), "r", "m", 4)
    assert _paths(sessions, done.run_id) == [str(tmp_path / f"{i}.png") for i in range(9)]


def test_bad_first_line_creates_no_run(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    _model(sessions)
    manifest = _manifest(tmp_path, ["path,label", "a.png,maybe", "b.png,good"])
    with pytest.raises(LayoutError, match=r"paths.csv:2: label"):
        register_run(sessions, iter_archive(manifest, "c"), "r", "m", 4)
    with sessions() as session:
        assert session.scalar(select(Image.id).limit(1)) is None


def test_pending_batches_page_through_the_run_and_retry_failed_requeues(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    _model(sessions)
    manifest = _manifest(tmp_path, [f"{i}.png" for i in range(11)])
    run = register_run(sessions, iter_archive(manifest, "c"), "r", "m", 2)
    with sessions.begin() as session:
        ids = pending_image_ids(session, run.run_id)
        mark_failed(session, run.run_id, {ids[4]: "unreadable"})
        session.execute(update(Image).where(Image.id == ids[0]).values(status="done"))
    with sessions() as session:
        batches = list(pending_id_batches(session, run.run_id, 2))  # pages of 2 batches of 2
    remaining = [i for i in ids if i not in (ids[0], ids[4])]
    assert batches == [remaining[i : i + 2] for i in range(0, len(remaining), 2)]

    retried = register_run(sessions, iter_archive(manifest, "c"), "r", "m", 2, retry=True)
    assert (retried.added, retried.retried, retried.pending) == (0, 1, 10)


def _per_row_progress(session: Session, run_id: int) -> list[CategoryProgress]:
    """What status computed before issue 12: every image and score row loaded and counted."""
    images = session.scalars(select(Image).where(Image.run_id == run_id)).all()
    scores = session.scalars(select(Score).where(Score.run_id == run_id)).all()
    rows = []
    for category in sorted({image.category for image in images}):
        statuses = [image.status for image in images if image.category == category]
        times = [score.scored_at for score in scores if score.category == category]
        rows.append(
            CategoryProgress(
                category,
                statuses.count("done"),
                statuses.count("failed"),
                statuses.count("pending"),
                min(times, default=None),
                max(times, default=None),
            )
        )
    return rows


def test_status_aggregates_equal_the_per_row_computation(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    for category in ("a", "b", "c"):
        _model(sessions, category)
        manifest = _manifest(tmp_path, [f"{category}{i}.png" for i in range(7)])
        run = register_run(sessions, iter_archive(manifest, category), "r", "m", 4)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with sessions.begin() as session:
        images = session.scalars(
            select(Image).where(Image.run_id == run.run_id, Image.category != "c")
        ).all()
        for number, image in enumerate(images):  # a: 4 done, b: 3 done; 1 failed each
            if number % 7 < 4:
                upsert_scores(session, [{"run_id": run.run_id, "image_id": image.id,
                                         "score": 1.0, "patch_map": np.zeros((2, 2)),
                                         "worker": "w", "duration_ms": 1.0}])  # fmt: skip
                image_time = start + timedelta(seconds=number)
                session.execute(
                    update(Score).where(Score.image_id == image.id).values(scored_at=image_time)
                )
            elif number % 7 == 5:
                mark_failed(session, run.run_id, {image.id: "broken"})
    with sessions() as session:
        aggregated = run_progress(session, run.run_id)
        assert aggregated == _per_row_progress(session, run.run_id)
    assert [(r.category, r.done, r.failed, r.pending) for r in aggregated] == [
        ("a", 4, 1, 2), ("b", 4, 1, 2), ("c", 0, 0, 7),
    ]  # fmt: skip
    assert aggregated[0].first_scored_at == start
