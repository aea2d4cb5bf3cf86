"""The workers' Celery app, built from this process's settings (PATCHQ_* variables).

`celery -A worker.app worker` and `patchq worker` both load this module; the configuration and
its delivery guarantees are in worker.config.
"""

from __future__ import annotations

from common.settings import Settings
from worker.config import TASK_NAME, make_app

__all__ = ["TASK_NAME", "app", "make_app", "settings"]

settings = Settings.load()
app = make_app(settings)
