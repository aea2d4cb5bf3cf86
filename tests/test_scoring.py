"""score_batch in-process: the model's numbers, bad files fail alone, redelivery is harmless."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from common.data.batches import decode_batch
from common.data.layouts import discover
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from common.pipelined import PipelinedScorer, score_pipelined
from common.scoring.batch import score_batch
from common.scoring.context import ScoringContext
from common.scoring.model_cache import ModelProvider
from common.store.image_rows import ImageRow, pending_image_ids, register_images, retry_failed
from common.store.model_rows import store_model
from common.store.run_rows import create_run
from common.store.schema import Image, Score
from common.store.score_rows import decode_array
from synthetic.layouts import make_seed_layout

CONFIG = PatchCoreConfig(image_size=64, coreset_ratio=0.25)


@dataclass(frozen=True)
class Fitted:
    model: PatchCore
    artifact: bytes
    test_paths: list[Path]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    root = tmp_path_factory.mktemp("data")
    make_seed_layout(root, "tex", n_good=10, n_bad=2, n_test=6, size=64)
    records = discover(root)
    result = fit_category(records, CONFIG, holdout=0.2, device="cpu", progress=False)
    test_paths = [r.path for r in records if r.split == "test"]
    return Fitted(result.model, save_artifact(result.model, "tex"), test_paths)


def _store(sessions: sessionmaker[Session], artifact: bytes) -> int:
    with sessions.begin() as session:
        return store_model(
            session, "tex", artifact, artifact_hash(artifact), "efficientnet_lite0", {}, None, 1
        )


def _run(
    sessions: sessionmaker[Session], model_id: int, paths: list[Path], name: str = "r"
) -> tuple[int, list[int]]:
    with sessions.begin() as session:
        run_id = create_run(session, name, "test", batch_size=len(paths))
        rows = [ImageRow(category="tex", path=str(p), model_id=model_id) for p in paths]
        register_images(session, run_id, rows)
        return run_id, pending_image_ids(session, run_id)


def _bad_files(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(good.read_bytes()[:200])
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    text = folder / "notes.png"
    text.write_text("not an image at all\n")
    return {"corrupt": corrupt, "missing": folder / "gone.png", "empty": empty, "text": text}


def _provider(sessions: sessionmaker[Session], tmp_path: Path) -> ModelProvider:
    return ModelProvider(sessions, tmp_path / "cache", device="cpu")


def _context(sessions: sessionmaker[Session], tmp_path: Path, worker: str = "w1") -> ScoringContext:
    return ScoringContext(sessions, _provider(sessions, tmp_path), worker)


def test_scores_equal_the_model_on_the_same_images(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), fitted.test_paths)
    outcome = score_batch(_context(sessions, tmp_path), run_id, ids)
    assert sorted(outcome.done) == ids and not outcome.failed
    assert all(outcome.timings[key] > 0 for key in ("decode_s", "backbone_s", "search_s"))

    expected = fitted.model.score_tensors(
        decode_batch(fitted.test_paths, fitted.model.preprocessing).tensor
    )
    with sessions() as session:
        rows = session.scalars(select(Score).order_by(Score.image_id)).all()
        statuses = set(session.scalars(select(Image.status)))
    assert statuses == {"done"}
    np.testing.assert_allclose([r.score for r in rows], expected.image_scores, rtol=1e-5)
    for row, patch_map, embedding in zip(
        rows, expected.patch_maps, expected.embeddings, strict=True
    ):
        stored = decode_array(row.patch_map, (row.map_height, row.map_width))
        np.testing.assert_allclose(stored, patch_map, rtol=2e-3, atol=1e-3)
        assert row.embedding is not None
        np.testing.assert_allclose(decode_array(row.embedding, (-1,)), embedding, atol=2e-2)
        assert row.worker == "w1" and row.duration_ms > 0


def test_bad_files_fail_with_reasons_and_the_rest_is_scored(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    bad = _bad_files(tmp_path / "bad", fitted.test_paths[0])
    paths = [*fitted.test_paths[:3], *bad.values()]
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), paths)
    outcome = score_batch(_context(sessions, tmp_path), run_id, ids)
    assert len(outcome.done) == 3 and len(outcome.failed) == 4
    with sessions() as session:
        errors = dict(session.execute(select(Image.path, Image.error)).all())
        failed = session.scalar(select(func.count()).where(Image.status == "failed"))
        scored = session.scalar(select(func.count()).select_from(Score))
    assert failed == 4 and scored == 3
    assert "file not found" in errors[str(bad["missing"])]
    assert "empty file" in errors[str(bad["empty"])]
    for kind in ("corrupt", "text"):
        assert errors[str(bad[kind])].startswith(str(bad[kind]))
    assert all(errors[str(p)] is None for p in fitted.test_paths[:3])


def test_redelivered_batch_writes_no_duplicates(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), fitted.test_paths)
    w1 = _context(sessions, tmp_path)
    w2 = replace(w1, worker="w2")
    score_batch(w1, run_id, ids)
    again = score_batch(w2, run_id, ids)
    assert again.skipped == ids and not again.done  # done images are not scored twice
    with sessions.begin() as session:  # a delivery that overlapped the first one's write
        session.execute(update(Image).values(status="pending"))
    overlap = score_batch(w2, run_id, ids)
    assert sorted(overlap.done) == ids
    assert _score_rows_per_image(sessions) == dict.fromkeys(ids, 1)
    with sessions() as session:
        workers = set(session.scalars(select(Score.worker)))
        attempts = set(session.scalars(select(Image.attempts)))
    # Claims count, deliveries of done images do not: w1's and the overlapping w2's.
    assert workers == {"w2"} and attempts == {2}


def test_images_delivered_too_often_are_failed_not_scored(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), fitted.test_paths[:2])
    with sessions.begin() as session:
        session.execute(update(Image).where(Image.id == ids[0]).values(attempts=3))
    context = replace(_context(sessions, tmp_path), max_deliveries=3)
    outcome = score_batch(context, run_id, ids)
    assert outcome.done == [ids[1]]
    assert outcome.failed == {ids[0]: "worker lost 3 times while scoring it; see the worker logs"}


def test_provider_caches_artifacts_on_disk_by_hash(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    model_id = _store(sessions, fitted.artifact)
    provider = _provider(sessions, tmp_path)
    model = provider.get(model_id)
    assert provider.get(model_id) is model
    cached = tmp_path / "cache" / f"{artifact_hash(fitted.artifact)}.npz"
    assert cached.read_bytes() == fitted.artifact
    cached.write_bytes(fitted.artifact[:100])  # a torn cache file is fetched again
    assert _provider(sessions, tmp_path).get(model_id).bank.size == model.bank.size
    assert cached.read_bytes() == fitted.artifact


def test_unwritable_model_cache_does_not_stop_scoring(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    provider = ModelProvider(sessions, blocker / "cache", device="cpu")
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), fitted.test_paths)
    outcome = score_batch(ScoringContext(sessions, provider, "w1"), run_id, ids)
    assert sorted(outcome.done) == ids and not outcome.failed
    assert list(tmp_path.glob("**/*.part")) == []


def test_failed_images_put_back_to_pending_are_scored_once_fixed(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    missing = tmp_path / "late" / "arrives-later.png"
    paths = [*fitted.test_paths[:2], missing]
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), paths)
    w1 = _context(sessions, tmp_path)
    assert len(score_batch(w1, run_id, ids).failed) == 1
    missing.parent.mkdir()
    shutil.copy(fitted.test_paths[2], missing)  # the cause is fixed
    with sessions.begin() as session:
        assert retry_failed(session, run_id) == 1
        assert pending_image_ids(session, run_id) == [ids[2]]
    outcome = score_batch(replace(w1, worker="w2"), run_id, ids)
    assert outcome.done == [ids[2]] and sorted(outcome.skipped) == ids[:2]
    with sessions() as session:
        statuses = dict(session.execute(select(Image.path, Image.status)).all())
        assert set(statuses.values()) == {"done"}
        assert session.scalar(select(func.count()).select_from(Score)) == 3
        assert session.scalar(select(Image.error).where(Image.id == ids[2])) is None


def test_pipelined_batches_score_like_serial_ones_and_write_once(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Three batches in flight at once: the same rows as one batch after the other."""
    model_id = _store(sessions, fitted.artifact)
    paths = [*fitted.test_paths, *_bad_files(tmp_path / "bad", fitted.test_paths[0]).values()]
    serial_run, serial_ids = _run(sessions, model_id, paths)
    serial = _context(sessions, tmp_path, "serial")
    for start in range(0, len(serial_ids), 2):
        score_batch(serial, serial_run, serial_ids[start : start + 2])
    run_id, ids = _run(sessions, model_id, paths, name="pipelined")
    scorer = PipelinedScorer(replace(serial, worker="pipelined"))
    batches = [ids[start : start + 2] for start in range(0, len(ids), 2)]
    outcomes = [outcome for _, outcome in score_pipelined(scorer, run_id, batches, depth=3)]
    assert sorted(i for o in outcomes for i in o.done) == ids[: len(fitted.test_paths)]
    assert sum(len(o.failed) for o in outcomes) == 4
    with sessions() as session:
        rows = session.execute(
            select(Image.run_id, Image.path, Image.status, Score.score).outerjoin(Score)
        ).all()
        per_image = set(
            session.scalars(select(func.count()).select_from(Score).group_by(Score.image_id))
        )
    by_run = {run: {p: (s, v) for r, p, s, v in rows if r == run} for run in (serial_run, run_id)}
    assert by_run[run_id] == by_run[serial_run] and per_image == {1}


def test_one_batch_delivered_three_times_at_once_is_written_once(
    fitted: Fitted, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id, ids = _run(sessions, _store(sessions, fitted.artifact), fitted.test_paths)
    scorer = PipelinedScorer(_context(sessions, tmp_path, "pipelined"))
    outcomes = [o for _, o in score_pipelined(scorer, run_id, [ids, ids, ids], depth=3)]
    assert _score_rows_per_image(sessions) == dict.fromkeys(ids, 1)
    with sessions() as session:
        statuses = set(session.scalars(select(Image.status)))
        attempts = set(session.scalars(select(Image.attempts)))
    assert statuses == {"done"} and scorer.overdue(0.0) == []
    # The threads share one lease holder, yet each image was claimed and scored by one thread
    # (the others left it out, or found it done): no second count towards the redelivery limit.
    assert sorted(i for o in outcomes for i in o.done) == ids and attempts == {1}


def _score_rows_per_image(sessions: sessionmaker[Session]) -> dict[int, int]:
    with sessions() as session:
        rows = session.execute(select(Score.image_id, func.count()).group_by(Score.image_id))
        return dict(rows.all())
