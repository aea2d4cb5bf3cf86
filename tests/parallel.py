"""How `make test` spreads the suite over pytest-xdist workers, and what keeps them apart.

Scheduling: the slowest modules' tests start first (SLOW_FIRST), so the short tests fill the
time around them instead of a long one finishing alone at the end. A module's tests go to one
worker together, so its module-scoped fixtures (a fit, a served run, a shared working folder)
are built once and its tests run in their order; only the modules in ONE_BY_ONE, whose tests
need neither a costly module fixture nor their order, are sent test by test to whichever
worker is free.

Isolation: each worker (gw0, gw1, ...) is its own process with its own temporary folders
(pytest's basetemp is per worker) and throwaway PostgreSQL databases (uuid names). What
remains shared is the machine: TCP ports and the Redis server. A worker therefore takes ports
from a slice of its own below Linux's ephemeral range (where no client connection can grab
them between the probe and the server's bind) and a Redis database index of its own. Queue
names are unique per test anyway and no test flushes a database, so a second `make test`
running at the same time on the same Redis (another checkout) only shares indexes, never
queues.
"""

from __future__ import annotations

import os
import random
import socket

from xdist.scheduler import LoadScopeScheduling

# The modules of the longest tests in a parallel run (docs/testing.md lists them), about
# longest first.
SLOW_FIRST = (
    "test_recovery.py",
    "test_cli_pipeline.py",
    "test_distributed.py",
    "test_s3_archive.py",
    "test_flower.py",
    "test_report.py",
    "test_review.py",
)
# Modules whose tests share no costly module-scoped fixture and need no order (test_cli_pipeline's
# working folder is cheap to make, and each of its tests passes alone in a fresh one): their
# cluster and CLI tests take up to a minute or more each, and one worker running a whole module
# of them in a row would end the suite last.
ONE_BY_ONE = frozenset(
    {
        "test_recovery.py",
        "test_distributed.py",
        "test_s3_archive.py",
        "test_report.py",
        "test_cli_pipeline.py",
    }
)
EPHEMERAL_START = 32_768  # Linux's default ip_local_port_range starts here
PORT_BASE = 20_000
PORTS_PER_WORKER = 1_000
PORT_SLICES = (EPHEMERAL_START - PORT_BASE) // PORTS_PER_WORKER  # 12; more workers share them
REDIS_INDEXES = range(1, 13)  # 0 is redis-cli's default; 13 and 14 belong to single tests


def worker_index() -> int:
    """0 for gw0 (or a run without xdist), 1 for gw1, and so on."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def worker_count() -> int:
    """How many xdist workers run the suite (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def free_port() -> int:
    """A port of this worker's slice that nothing listens on now."""
    start = PORT_BASE + (worker_index() % PORT_SLICES) * PORTS_PER_WORKER
    # In random order: a concurrent `make test` of another checkout probes the same slice.
    candidates = random.sample(range(start, start + PORTS_PER_WORKER), PORTS_PER_WORKER)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + PORTS_PER_WORKER - 1}")


def redis_index() -> int:
    """The shared Redis server's database index for this worker's tests."""
    return REDIS_INDEXES[worker_index() % len(REDIS_INDEXES)]


def slowness_rank(module: str) -> int:
    """Position of a test module's file name in SLOW_FIRST; after all of them if absent."""
    return SLOW_FIRST.index(module) if module in SLOW_FIRST else len(SLOW_FIRST)


class ModulesTogether(LoadScopeScheduling):
    """xdist's loadscope with a module as the scope (not a class), and a test alone as the
    scope in ONE_BY_ONE modules; scopes are handed out in collection order."""

    def _split_scope(self, nodeid: str) -> str:
        module = nodeid.split("::", 1)[0]
        return nodeid if module.rsplit("/", 1)[-1] in ONE_BY_ONE else module
