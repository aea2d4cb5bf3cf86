"""Thread coordination for a batch a worker was lost on: scored alone in its process."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Isolation:
    """Lets a batch a worker was lost on be scored with nothing else in flight in its process.

    Batches are scored `shared` (several threads of a pipelined scorer at once); the images
    of a batch a worker was lost on are scored `alone`, one by one, each once every batch in
    flight has been written and before another is claimed. A process that then dies was
    killed by that image, and only that image's claim count goes up: batchmates and the
    other threads' batches are never counted toward the limit for a poison image's crashes.
    Waiting `alone` calls go before new `shared` ones.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._sharing = 0
        self._waiting_alone = 0
        self._alone = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._sharing += 1
        try:
            yield
        finally:
            with self._changed:
                self._sharing -= 1
                self._changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._waiting_alone += 1
            self._changed.wait_for(lambda: not self._alone and not self._sharing)
            self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()
