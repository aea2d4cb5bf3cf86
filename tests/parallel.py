"""What keeps the pytest-xdist workers of one `make test` apart on the shared servers.

Each worker (gw0, gw1, ...) is its own process with its own temporary folders (pytest's
basetemp is per worker) and throwaway PostgreSQL databases (uuid names). What remains shared
is the machine: TCP ports and the Redis server. A worker therefore takes ports from a slice of
its own below Linux's ephemeral range (where no client connection can grab them between the
probe and the server's bind) and a Redis database index of its own. Queue names are unique
per test anyway and no test flushes a database, so a second `make test` running at the same
time on the same Redis (another checkout) only shares indexes, never queues.
"""

from __future__ import annotations

import os
import random
import socket

PORT_BASE = 20_000  # ports below 32768, the start of Linux's ephemeral range
PORTS_PER_WORKER = 1_000  # 12 workers fit below the ephemeral range
REDIS_INDEXES = range(1, 13)  # 0 is redis-cli's default; 13 and 14 belong to single tests


def worker_index() -> int:
    """0 for gw0 (or a run without xdist), 1 for gw1, and so on."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))


def worker_count() -> int:
    """How many xdist workers run the suite (1 without xdist)."""
    return int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))


def free_port() -> int:
    """A port of this worker's slice that nothing listens on now."""
    start = PORT_BASE + (worker_index() % 12) * PORTS_PER_WORKER
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
