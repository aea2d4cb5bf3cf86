"""Streams cut into lists, for work that goes out in bounded pieces (rows per INSERT, images per
registration transaction, messages per broker round trip) without holding the whole stream, and
streams read ahead by a thread, so that waiting for the next piece overlaps with the work."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from queue import Full, Queue
from typing import TypeVar

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter), read lazily from ``items``."""
    stream = iter(items)
    while chunk := list(itertools.islice(stream, size)):
        yield chunk


class _Failed:
    """What the producing thread of `read_ahead` raised, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items``, produced by a thread of their own at most ``depth`` ahead of the consumer.

    For a producer that waits (a listing on the network) feeding a consumer that works (rows
    to register): the two overlap instead of taking turns, and memory stays bounded. An error
    of the producer is raised in the consumer, where the item would have come; a consumer that
    stops early stops the producer at its next item.
    """
    queue: Queue[object] = Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        queue.put(item, timeout=0.1)
                        break
                    except Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as error:  # handed to the consumer, which raises it
            queue.put(_Failed(error))
            return
        queue.put(end)

    threading.Thread(target=produce, name="read-ahead", daemon=True).start()
    try:
        while (item := queue.get()) is not end:
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
