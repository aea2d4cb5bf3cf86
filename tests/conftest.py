"""Shared fixtures (a fresh, empty database on each dialect patchq supports) and the hooks
that let pytest-xdist run the suite in parallel (docs/testing.md)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from common.store.database import init_db, make_engine, make_session_factory
from tests.parallel import worker_count

# Fixtures of helper modules: real-process clusters (workers, private brokers and servers) and
# the fitted, scored run the aggregator tests share.
pytest_plugins = ["tests.cluster", "tests.aggregate_data"]

# The PostgreSQL test server; each test gets its own database created (and dropped) through it.
POSTGRES_ADMIN_URL = os.environ.get(
    "PATCHQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, split the cores between the workers' torch thread pools: every worker's
    torch using every core would oversubscribe the machine while workers fit side by side."""
    if worker_count() > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // worker_count()))


# The modules of the longest tests (docs/testing.md lists them), about longest first.
SLOW_FIRST = (
    "test_recovery.py",
    "test_distributed.py",
    "test_review_update.py",
    "test_review.py",
    "test_cli_pipeline.py",
    "test_report.py",
    "test_scoring.py",
    "test_flower.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the slowest modules' tests first, and keep a module's tests that share a
    module-scoped fixture together.

    With `--dist loadgroup` a test without a group goes to whichever worker is free, in this
    order: the cluster tests wait a minute or two on workers, leases and outages, so starting
    them first lets the short tests fill the time around them instead of one finishing alone
    at the end. Tests sharing a module fixture (a fit, a served run, a module's working folder)
    are grouped per module, so that fixture is built once and they keep their order.
    """
    rank = {name: position for position, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable
    for item in items:
        fixturedefs = getattr(item, "_fixtureinfo", None)
        defs = fixturedefs.name2fixturedefs.values() if fixturedefs else ()
        if any(d[-1].scope == "module" for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    """An autocommit engine on the test server (CREATE DATABASE cannot run in a transaction)."""
    engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as error:
        pytest.skip(f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable: {error.orig}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin: Engine) -> Iterator[str]:
    """URL of an empty, throwaway PostgreSQL database on the test server."""
    name = f"patchq_test_{uuid.uuid4().hex[:12]}"
    with postgres_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with postgres_admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty database (no tables): a SQLite file, or a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'patchq.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """A migrated, empty patchq database on each dialect."""
    engine = make_engine(db_url)
    init_db(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)
