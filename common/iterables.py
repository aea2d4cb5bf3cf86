"""Streams cut into lists, for work that goes out in bounded pieces (rows per INSERT, images per
registration transaction, messages per broker round trip) without holding the whole stream."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last one shorter), read lazily from ``items``."""
    stream = iter(items)
    while chunk := list(itertools.islice(stream, size)):
        yield chunk
