"""A scoring process's heartbeat: a thread that, every PATCHQ_HEARTBEAT_S seconds,

- writes the process's row in the workers table (`patchq status` tells live from lost);
- renews the leases of the batches being scored (one per pool thread with the threads pool),
  so nobody requeues them while they are worked on;
- runs the requeue sweep (worker.sweeper), so recovery needs no producer alive.

It lives in the process that scores (the prefork pool's child, or the main process of a
solo or threads pool: the default worker's supervised child), started after any fork, so a
killed process's leases stop being renewed with it. A database or broker outage only makes
it log and retry with backoff: it never stops, and it never fails an image.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from common.errors import PatchqError
from common.settings import Settings
from common.store.leases import Lease, renew
from common.store.schema import utcnow
from common.store.workers import Beat, mark_stopped, process_name, record_beat
from worker.sweeper import sweep

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 30


class Heartbeat:
    """The heartbeat of this process; `working_on` tells it which batches' leases to renew."""

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        app: Celery,
        settings: Settings,
        node: str,
    ) -> None:
        self._sessions = sessions  # called each beat: the database may be down at start
        self._app = app
        self._settings = settings
        self.lease = Lease(node, settings.lease_s)
        self.name = process_name(node, os.getpid())
        self._started_at = utcnow()
        self._device = _device_label(settings.device)
        self._lock = threading.Lock()
        self._current: dict[int, tuple[int, list[int]]] = {}  # thread id -> its batch
        self._batches = self._images = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patchq-heartbeat", daemon=True)
        self._thread.start()

    @contextmanager
    def working_on(self, run_id: int, image_ids: Sequence[int]) -> Iterator[None]:
        """Renew this batch's lease while the block runs; count it when it returns. Each
        thread of a threads pool has a batch of its own."""
        thread = threading.get_ident()
        with self._lock:
            self._current[thread] = (run_id, list(image_ids))
        try:
            yield
            with self._lock:
                self._batches += 1
                self._images += len(image_ids)
        finally:
            with self._lock:
                del self._current[thread]

    def stop(self) -> None:
        """Stop beating and record a clean exit, so status says stopped rather than lost."""
        self._stopping.set()
        self._thread.join(timeout=self._settings.heartbeat_s + 5)
        try:
            with self._sessions().begin() as session:
                mark_stopped(session, self.name)
        except Exception as error:  # exiting anyway: the row then just ages into "lost"
            log.warning("could not record that %s stopped: %s", self.name, error)

    def _run(self) -> None:
        delay = self._settings.heartbeat_s
        while True:
            try:
                self._beat()
                delay = self._settings.heartbeat_s
            except Exception as error:  # outages are normal: keep beating, back off meanwhile
                delay = min(2 * delay, MAX_BACKOFF_S)
                log.warning("heartbeat failed (%s); next try in %d s", _first_line(error), delay)
            if self._stopping.wait(delay):
                return

    def _beat(self) -> None:
        sessions = self._sessions()
        with self._lock:
            current = [batch for batch in self._current.values() if batch[1]]
            beat = Beat(
                name=self.name,
                node=self.lease.holder,
                host=socket.gethostname(),
                pid=os.getpid(),
                device=self._device,
                started_at=self._started_at,
                batches_done=self._batches,
                images_done=self._images,
                current_batch="; ".join(map(_describe, current)) or None,
            )
        with sessions.begin() as session:
            record_beat(session, beat)
            if current:
                renew(session, [i for _, ids in current for i in ids], self.lease)
        sweep(sessions, self._app, self._settings.queue, self._settings.lease_s)


def _describe(batch: tuple[int, list[int]]) -> str:
    run_id, ids = batch
    return f"run {run_id}: {len(ids)} images (ids {ids[0]}..{ids[-1]})"


def _device_label(setting: str) -> str:
    from common.engine.patchcore import resolve_device  # torch: only in scoring processes

    try:
        return str(resolve_device(setting))
    except PatchqError:
        return setting


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
