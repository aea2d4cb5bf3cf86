"""`patchq worker`'s supervisor: runs the pipelined Celery worker as a child and survives it.

A pipelined worker (Celery's threads pool, common.pipelined) scores PATCHQ_PIPELINE_DEPTH
batches in one process, so an image that kills that process (a decoder crash, an
out-of-memory kill) takes the whole worker down, and Celery, which replaces a dead pool child,
cannot replace its own main process. This small parent process, which imports neither torch
nor the Celery worker, does that:

- it starts `celery -A worker.app worker` with the command's options, under the node name it
  resolved itself (so it knows whose leases are whose);
- SIGTERM or SIGINT reach the child as SIGTERM, Celery's warm shutdown: the batches in hand
  are finished and written, then both exit and nothing is restarted;
- when the child exits any other way (killed by a signal, a nonzero exit such as the threads
  pool's time-limit watchdog), the images its node still leases are requeued and their
  leases cleared at once (worker.sweeper.requeue_held), instead of after PATCHQ_LEASE_S, and
  the child is started again, after a pause that doubles while it keeps dying young. The
  claims of those images were counted, so a batch lost this way is retried image by image
  and an image that keeps killing the worker fails after PATCHQ_MAX_REDELIVERIES
  (common.scoring), as with a prefork pool child.

The child stays in the supervisor's process group, so a signal to the group (Ctrl-C in a
terminal, SIGSTOP, SIGKILL of the whole worker) reaches both; on Linux a child whose
supervisor is killed alone gets SIGTERM and drains, rather than score on unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

from common.settings import Settings
from common.store.connection import open_database
from common.store.workers import mark_died, process_name
from worker.broker_check import broker_app
from worker.sweeper import requeue_held

log = logging.getLogger(__name__)
FIRST_PAUSE_S = 0.5
MAX_PAUSE_S = 30.0
HEALTHY_AFTER_S = 60.0  # a child that lived this long died of something new: pause reset
POLL_S = 0.2
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Supervisor:
    """Runs `celery worker ARGS` as node `node` until asked to stop; see the module docstring."""

    def __init__(self, celery_args: Sequence[str], node: str, queue: str, settings: Settings):
        self._argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", *celery_args]
        self._node = node
        self._queue = queue  # requeued batches go where this worker will take them again
        self._settings = settings
        self._stopping = False
        self._child: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Run the child, restarting it after crashes; returns its exit status once stopped."""
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        deaths = 0
        while True:
            started = time.monotonic()
            child = self._run_child()
            status = child.returncode
            self._give_back(dead_pid=None if status == 0 else child.pid)
            if self._stopping or status == 0:
                return status if status >= 0 else 128 - status
            deaths = deaths + 1 if time.monotonic() - started < HEALTHY_AFTER_S else 1
            pause = min(MAX_PAUSE_S, FIRST_PAUSE_S * 2 ** (deaths - 1))
            log.error("worker process %s; starting a new one in %.1f s", _how(status), pause)
            self._sleep(pause)
            if self._stopping:
                return 0

    def _run_child(self) -> subprocess.Popen[bytes]:
        """Start the child and wait for it to exit; the exited child."""
        follow = _follow_parent if sys.platform == "linux" else None
        self._child = subprocess.Popen(self._argv, preexec_fn=follow)
        if self._stopping:  # the signal came while it was being started
            self._child.send_signal(signal.SIGTERM)
        self._child.wait()
        return self._child

    def _stop(self, signum: int, _: FrameType | None) -> None:
        """Drain: the child gets SIGTERM (Celery's warm shutdown) whichever signal came, since
        a second SIGINT would make Celery cancel the batches in hand."""
        log.warning("signal %d: the worker finishes its batches and exits", signum)
        self._stopping = True
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def _give_back(self, dead_pid: int | None) -> None:
        """Requeue what the child's node still leases (nothing after a clean drain) and, if it
        died (`dead_pid`), mark its heartbeat row so that status does not count it lost. A
        database or broker that is down now only delays it: the sweep requeues those leases
        when they run out (and the row shows lost meanwhile, which is then true)."""
        try:
            with open_database(self._settings.database_url) as (_, sessions):
                requeue_held(sessions, broker_app(self._settings), self._queue, self._node)
                if dead_pid is not None:
                    with sessions.begin() as session:
                        mark_died(session, process_name(self._node, dead_pid))
        except Exception as error:  # any outage: the leases still run out and get swept
            log.warning("could not requeue what %s held (%s); the sweep will", self._node, error)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            time.sleep(POLL_S)


def _follow_parent() -> None:
    """In the child, before exec: SIGTERM (drain) when the supervisor dies."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _how(status: int) -> str:
    if status < 0:
        return f"killed by signal {-status} ({signal.strsignal(-status)})"
    return f"exited with status {status}"
