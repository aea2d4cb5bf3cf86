"""The workers table: one row per scoring process, written by its heartbeat (worker.heartbeat).

`patchq status` reads it to tell live workers from lost ones; the name is the one scores carry
in scores.worker ("node/pid"), and node is the Celery node name Flower shows.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from common.store.schema import Base, UtcDateTime, utcnow


class Worker(Base):
    """A scoring process as its last heartbeat described it."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # node/pid
    node: Mapped[str] = mapped_column(String(255), index=True)  # Celery node, e.g. gpu0@host
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="alive")  # or stopped, died
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    batches_done: Mapped[int] = mapped_column(Integer, default=0)
    images_done: Mapped[int] = mapped_column(Integer, default=0)
    current_batch: Mapped[str | None] = mapped_column(Text)  # "run 3: 32 images" while scoring
