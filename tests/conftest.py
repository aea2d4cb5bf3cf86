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
from xdist.remote import Producer
from xdist.scheduler import Scheduling

from common.store.connection import init_db, make_engine, make_session_factory
from tests.parallel import ModulesTogether, slowness_rank, worker_count

# Fixtures of helper modules: real-process clusters (workers, private brokers and servers) and
# the fitted, scored run the aggregator tests share.
pytest_plugins = ["tests.cluster", "tests.aggregate_data", "tests.object_server"]

# The PostgreSQL test server; each test gets its own database created (and dropped) through it.
POSTGRES_ADMIN_URL = os.environ.get(
    "PATCHQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, split the cores between the workers' torch thread pools, this process's and
    those of the patchq processes its tests start (OMP_NUM_THREADS): torch on every core in
    every worker would oversubscribe the machine while workers fit and score side by side."""
    if worker_count() > 1:
        threads = max(1, (os.cpu_count() or 1) // worker_count())
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slowest modules' tests first (tests.parallel.SLOW_FIRST), the rest as collected."""
    items.sort(key=lambda item: slowness_rank(item.path.name))  # stable: modules keep order


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which builds the stock loadscope
def pytest_xdist_make_scheduler(config: pytest.Config, log: Producer) -> Scheduling | None:
    """`--dist loadscope` with the scopes of tests.parallel (`make test` uses it)."""
    return ModulesTogether(config, log) if config.getvalue("dist") == "loadscope" else None


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
