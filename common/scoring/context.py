"""What every batch one scorer scores shares, handed to each stage as one object."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from common.scoring.isolation import Isolation
from common.scoring.model_cache import ModelProvider
from common.store.leases import Lease


@dataclass(frozen=True)
class ScoringContext:
    """The database, the models and the scoring process's identity and limits.

    `max_deliveries`: an image claimed more often than this is marked failed instead of scored
    (None: no limit). `lease`: who claims the images and for how long (None: `worker`, with
    the default lease time). `pin_memory`: decode into page-locked memory, so that the copy
    to a GPU can be asynchronous (pointless on CPU). `device`: held while the backbone and
    the index run; a pipelined scorer (common.pipelined) makes it a lock, so that one batch
    at a time is there while the others claim, decode and write. `isolation`: shared by every
    thread scoring with this context (see `Isolation`).
    """

    sessions: sessionmaker[Session]
    models: ModelProvider
    worker: str
    max_deliveries: int | None = None
    lease: Lease | None = None
    pin_memory: bool = False
    device: AbstractContextManager[object] = field(default_factory=nullcontext)
    isolation: Isolation = field(default_factory=Isolation)
