"""The SQL layer on both dialects: migrations, idempotent writes, progress, clear errors."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, event, func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from common.store.connection import MIGRATIONS_DIR, DatabaseError, init_db, make_engine, schema_head
from common.store.image_rows import (
    ImageRow,
    images_by_id,
    mark_failed,
    pending_image_ids,
    register_images,
)
from common.store.model_rows import (
    latest_model_id,
    load_model_bytes,
    model_content_hash,
    store_model,
)
from common.store.run_rows import create_run, run_id_by_name, run_progress
from common.store.schema import Base, Image, Score
from common.store.score_rows import ScoreRow, decode_array, encode_array, upsert_scores

# What this transaction has written to scores so far (PostgreSQL's own counters).
ROW_WRITES = "SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables WHERE relname = 'scores'"


def _model(session: Session, category: str = "cell", content: bytes = b"artifact") -> int:
    return store_model(
        session,
        category=category,
        artifact_bytes=content,
        content_hash=content.hex().ljust(64, "0"),
        backbone="efficientnet_lite0",
        config={"coreset_ratio": 0.1},
        validation={"auroc": 0.9},
        bank_size=100,
    )


def _run_with_images(session: Session, categories: dict[str, int]) -> tuple[int, list[int]]:
    """A run holding `count` images of each category; returns (run id, image ids)."""
    run_id = create_run(session, name=None, source="/data", batch_size=4)
    for category, count in categories.items():
        model_id = _model(session, category, content=category.encode())
        rows: list[ImageRow] = [
            {"category": category, "path": f"/data/{category}/{i}.png", "model_id": model_id}
            for i in range(count)
        ]
        register_images(session, run_id, rows)
    return run_id, pending_image_ids(session, run_id)


def _score(run_id: int, image_id: int, score: float, worker: str = "w1") -> ScoreRow:
    return {
        "run_id": run_id,
        "image_id": image_id,
        "score": score,
        "patch_map": np.full((3, 4), score, dtype=np.float32),
        "embedding": np.arange(5, dtype=np.float32),
        "worker": worker,
        "duration_ms": 12.5,
    }


def test_migrations_create_tables_and_indexes(engine: Engine) -> None:
    init_db(engine)  # a second start must be a no-op
    inspector = inspect(engine)
    assert {"models", "runs", "images", "scores", "alembic_version"} <= set(
        inspector.get_table_names()
    )
    assert {tuple(ix["column_names"]) for ix in inspector.get_indexes("images")} >= {
        ("run_id", "status", "id"),
        ("run_id", "category", "status"),
    }
    assert {("run_id", "category", "score"), ("run_id", "category", "scored_at")} <= {
        tuple(ix["column_names"]) for ix in inspector.get_indexes("scores")
    }
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == head


def test_schema_head_is_alembics_head_and_files_are_named_by_revision() -> None:
    """init_db skips alembic for a database at schema_head(), so it must be the real head."""
    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    assert schema_head() == scripts.get_current_head()
    for script in scripts.walk_revisions():
        assert Path(script.path).name.split("_", 1)[0] == script.revision


def test_migrations_match_the_models(engine: Engine) -> None:
    """A change to common/store/schema.py without a new migration fails here."""
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []


def test_schema_newer_than_code_is_a_clear_error(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(DatabaseError, match="upgrade patchq on this machine"):
        init_db(engine)


def test_upsert_twice_keeps_one_row_with_the_second_values(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run_id, (first, second) = _run_with_images(session, {"cell": 2})
        upsert_scores(session, [_score(run_id, first, 1.0), _score(run_id, second, 2.0)])
    with sessions.begin() as session:
        upsert_scores(session, [_score(run_id, first, 3.0, worker="w2")])
    with sessions.begin() as session:
        rows = session.scalars(select(Score).order_by(Score.image_id)).all()
        assert [(r.image_id, r.score, r.worker) for r in rows] == [
            (first, 3.0, "w2"),
            (second, 2.0, "w1"),
        ]
        np.testing.assert_array_equal(
            decode_array(rows[0].patch_map, (rows[0].map_height, rows[0].map_width)),
            np.full((3, 4), 3.0),
        )
        assert rows[0].embedding is not None
        assert decode_array(rows[0].embedding, (-1,)).tolist() == [0, 1, 2, 3, 4]
        assert rows[0].scored_at.tzinfo is not None
        assert rows[0].scored_at.utcoffset() == UTC.utcoffset(None)
        assert pending_image_ids(session, run_id) == []


def test_upsert_is_one_statement_and_a_repeated_key_keeps_its_last_row(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    with sessions.begin() as session:
        rows = [_score(run_id, image_id, 1.0) for image_id in ids]
        upsert_scores(session, [*rows, _score(run_id, ids[0], 9.0)])
        if engine.dialect.name == "postgresql":  # each row written once, not once per row
            assert session.scalar(text(ROW_WRITES)) == 3
    assert sum("INSERT INTO scores" in sql for sql in statements) == 1
    with sessions.begin() as session:
        assert session.scalar(select(func.count()).select_from(Score)) == 3
        assert session.get(Score, (run_id, ids[0])).score == 9.0  # type: ignore[union-attr]


def test_register_images_is_idempotent_on_run_and_path(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        model_id = _model(session)
        run_id = create_run(session, name="nightly", source="/data", batch_size=8)
        rows: list[ImageRow] = [
            {"category": "cell", "path": f"/x/{i}.png", "model_id": model_id, "label": i % 2}
            for i in range(3)
        ]
        assert register_images(session, run_id, rows) == 3
    with sessions.begin() as session:
        extra: ImageRow = {"category": "cell", "path": "/x/new.png", "model_id": model_id}
        assert register_images(session, run_id, [*rows, extra]) == 1
        images = images_by_id(session, pending_image_ids(session, run_id))
        assert [(i.path, i.label, i.status, i.attempts) for i in images] == [
            ("/x/0.png", 0, "pending", 0),
            ("/x/1.png", 1, "pending", 0),
            ("/x/2.png", 0, "pending", 0),
            ("/x/new.png", None, "pending", 0),
        ]
        assert run_id_by_name(session, "nightly") == run_id
        assert run_id_by_name(session, "other") is None


def test_pending_ids_exclude_done_and_failed(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 4})
        upsert_scores(session, [_score(run_id, ids[0], 1.0)])
        mark_failed(session, run_id, {ids[1]: "corrupt"})
    with sessions.begin() as session:
        assert pending_image_ids(session, run_id) == ids[2:]


def test_mark_failed_stores_reasons_and_never_undoes_a_result(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3})
        upsert_scores(session, [_score(run_id, ids[2], 1.0)])
    with sessions.begin() as session:
        mark_failed(session, run_id, {ids[0]: "missing file", ids[1]: "not an image", ids[2]: "x"})
    with sessions.begin() as session:
        images = images_by_id(session, ids)
        assert [(i.status, i.error) for i in images] == [
            ("failed", "missing file"),
            ("failed", "not an image"),
            ("done", None),
        ]


def test_run_progress_counts_per_category(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 3, "bottle": 2})
        bottle = [i.id for i in images_by_id(session, ids) if i.category == "bottle"]
        upsert_scores(session, [_score(run_id, bottle[0], 1.0), _score(run_id, bottle[1], 2.0)])
        mark_failed(session, run_id, {ids[0]: "corrupt"})
    with sessions.begin() as session:
        progress = run_progress(session, run_id)
        assert [(p.category, p.done, p.failed, p.pending, p.total) for p in progress] == [
            ("bottle", 2, 0, 0, 2),
            ("cell", 0, 1, 2, 3),
        ]
        assert progress[0].first_scored_at is not None
        assert progress[0].last_scored_at is not None
        assert progress[0].first_scored_at <= progress[0].last_scored_at
        assert progress[1].first_scored_at is None
        assert run_progress(session, run_id + 1) == []


def test_store_model_is_idempotent_on_content_hash(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        first = _model(session, "cell", b"one")
        assert _model(session, "cell", b"one") == first
        second = _model(session, "cell", b"two")
    with sessions.begin() as session:
        assert second != first
        assert latest_model_id(session, "cell") == second
        assert latest_model_id(session, "bottle") is None
        assert load_model_bytes(session, first) == (b"one", b"one".hex().ljust(64, "0"))
        assert model_content_hash(session, second) == b"two".hex().ljust(64, "0")
        with pytest.raises(DatabaseError, match="model 999 is not in the database"):
            load_model_bytes(session, 999)


def test_foreign_keys_are_enforced(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError, match=r"(?i)foreign key"), sessions.begin() as session:
        run_id = create_run(session, name=None, source="/data", batch_size=4)
        register_images(session, run_id, [{"category": "c", "path": "/p", "model_id": 42}])


def test_sqlite_is_tuned_for_concurrent_workers(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as connection:
        assert connection.scalar(text("PRAGMA journal_mode")) == "wal"
        assert connection.scalar(text("PRAGMA foreign_keys")) == 1
        assert connection.scalar(text("PRAGMA busy_timeout")) == 30_000
    engine.dispose()


def test_unreachable_postgres_is_one_clear_line_without_the_password() -> None:
    with pytest.raises(DatabaseError) as caught:
        make_engine("postgresql://patchq:s3cret@127.0.0.1:1/results")
    message = str(caught.value)
    assert message.startswith("cannot reach the database at postgresql://patchq:***@127.0.0.1:1/")
    assert "check PATCHQ_DATABASE_URL and that the server is running" in message
    assert "s3cret" not in message
    assert "\n" not in message


def test_unusable_urls_are_clear_errors(tmp_path) -> None:
    with pytest.raises(DatabaseError, match="that its folder exists"):
        make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    with pytest.raises(DatabaseError, match="is not a database URL"):
        make_engine("patchq.db")
    with pytest.raises(DatabaseError, match="supports sqlite"):
        make_engine("mysql://u:p@host/db")


def test_arrays_round_trip_as_float16() -> None:
    array = np.linspace(0, 10, 12, dtype=np.float32).reshape(3, 4)
    data = encode_array(array)
    assert len(data) == 12 * 2
    decoded = decode_array(data, (3, 4))
    assert decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, array, rtol=1e-3)


def test_image_rows_are_readable_after_commit(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        run_id, ids = _run_with_images(session, {"cell": 1})
        images = images_by_id(session, ids)
    assert isinstance(images[0], Image)
    assert images[0].path == "/data/cell/0.png"
    assert images[0].run_id == run_id
