"""Reaching the results database: engines tuned per dialect, the schema migrated to this
patchq's head, and the dialect facts the statement modules share.

Everything here differs between SQLite (the embedded default) and PostgreSQL (production), so
the modules of statements beside it are written once for both dialects.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import PatchqError
from common.settings import mask_url
from common.store.schema import Base

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
_MIGRATION_LOCK_KEY = 0x70617463  # "patc": one PostgreSQL advisory lock serialises migrations
QUERY_CHUNK = 500  # values per IN (...) list, well inside both dialects' parameter limits


class DatabaseError(PatchqError):
    """The database cannot be used as configured; the message names the URL (masked) and the fix."""


def make_engine(url: str) -> Engine:
    """An engine for `url`, tuned per dialect and checked to connect, else DatabaseError.

    SQLite gets WAL (readers never block the writer), a busy timeout (concurrent writers wait
    instead of failing) and enforced foreign keys; PostgreSQL gets pre-ping, so a pooled
    connection the server dropped is replaced rather than failing a batch. A bare postgresql://
    URL uses psycopg 3, the driver patchq installs.
    """
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(
            f"PATCHQ_DATABASE_URL={mask_url(url)!r} is not a database URL; use e.g. "
            "sqlite:///patchq.db or postgresql+psycopg://user:password@host/db"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    try:
        engine = _create_engine(parsed, backend)
    except (NoSuchModuleError, ImportError):
        raise DatabaseError(
            f"PATCHQ_DATABASE_URL={mask_url(url)!r}: patchq supports sqlite:/// and "
            "postgresql+psycopg:// URLs"
        ) from None
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        engine.dispose()
        reason = str(error.orig).strip().splitlines()[0]
        check = (
            "that its folder exists and is writable"
            if backend == "sqlite"
            else "that the server is running"
        )
        raise DatabaseError(
            f"cannot reach the database at {mask_url(url)}: {reason}; "
            f"check PATCHQ_DATABASE_URL and {check}"
        ) from None
    return engine


def _create_engine(url: URL, backend: str) -> Engine:
    if backend == "sqlite":
        engine = create_engine(url)
        event.listen(engine, "connect", _configure_sqlite)
        return engine
    if backend == "postgresql":
        return create_engine(
            url, pool_pre_ping=True, connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        )
    raise NoSuchModuleError(backend)


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each WAL checkpoint; safe with WAL
    cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose loaded rows stay readable after commit (workers use them after the write)."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def open_database(url: str) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    """Engine and sessions on ``url``, migrated to this patchq's schema; the engine is
    disposed on exit, errors included, so no command leaves connections behind."""
    engine = make_engine(url)
    try:
        init_db(engine)
        yield engine, make_session_factory(engine)
    finally:
        engine.dispose()


def init_db(engine: Engine) -> None:
    """Bring the schema to the newest revision shipped with this patchq; safe to call each start.

    A database already at that revision is left alone after one query, without importing
    alembic: alembic and its migration scripts took most of the start-up of every command,
    `patchq status` included. On PostgreSQL an advisory lock makes concurrent callers (a
    producer and workers starting together) migrate one at a time.
    """
    with engine.begin() as connection:
        if _schema_revision(connection) == schema_head():
            return
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY}
            )
        _migrate(connection)


def schema_head() -> str:
    """The newest migration shipped with this patchq: revisions are named by their files'
    number prefixes (NNNN_what.py declares revision "NNNN") and each follows a lower one;
    tests/test_database.py checks this against alembic's own reading of the chain."""
    return max(path.name.split("_", 1)[0] for path in (MIGRATIONS_DIR / "versions").glob("*.py"))


def _schema_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    return connection.scalar(text("SELECT max(version_num) FROM alembic_version"))


def _migrate(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.util.exc import CommandError

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    try:
        command.upgrade(config, "head")
    except CommandError as error:
        raise DatabaseError(
            f"cannot migrate the database at {mask_url(str(connection.engine.url))}: {error}; "
            "a newer patchq may have migrated it, so upgrade patchq on this machine"
        ) from None


def insert_statement(session: Session, entity: type[Base]) -> Any:
    """The dialect's Core INSERT, which knows ON CONFLICT."""
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(entity.__table__)
