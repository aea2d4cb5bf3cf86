"""The Celery app, built as the workers build it, once the broker has answered.

Every process that talks to the broker starts here (`patchq submit`, `run`, `worker`, `flower`
and the worker supervisor), so an unreachable broker is one line naming it rather than a
reconnect loop. Celery is imported only when a broker is checked: the commands import this
module at start-up, and in-process runs never need Celery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.errors import PatchqError
from common.settings import Settings, mask_url

if TYPE_CHECKING:
    from celery import Celery

BROKER_CHECK_TIMEOUT_S = 3.0


class BrokerError(PatchqError):
    """The broker cannot be reached or is not configured."""


def broker_app(settings: Settings) -> Celery:
    """The Celery app (as the workers build it) after checking the broker answers."""
    from worker.config import make_app

    app = make_app(settings)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_CHECK_TIMEOUT_S)
    except Exception as error:  # kombu wraps every transport's own connection errors
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BrokerError(
            f"cannot reach the broker at {mask_url(settings.broker_url or '')}: {reason}; "
            "start Redis there or fix PATCHQ_BROKER_URL"
        ) from None
    return app
