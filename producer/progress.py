"""Following a run in the database: wait for it to finish, describe its progress and failures."""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tqdm import tqdm

from common.store.run_rows import CategoryProgress, run_progress
from common.store.schema import Image
from producer.submission import SubmitError

POLL_S = 1.0


def wait_for_run(
    sessions: sessionmaker[Session],
    run_id: int,
    timeout_s: float | None = None,
    progress: bool = True,
) -> list[CategoryProgress]:
    """Follow the run in the database until nothing is pending (or `timeout_s` passes)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with sessions() as session:
        rows = run_progress(session, run_id)
    total = sum(row.total for row in rows)
    with tqdm(total=total, desc="scoring", unit="img", disable=not progress) as bar:
        while True:
            finished = sum(row.done + row.failed for row in rows)
            bar.update(finished - bar.n)
            bar.set_postfix(failed=sum(row.failed for row in rows))
            if finished == total:
                return rows
            if deadline is not None and time.monotonic() > deadline:
                raise SubmitError(
                    f"run {run_id} still has {total - finished} pending images after "
                    f"{timeout_s:.0f} s; check that workers are running (`patchq worker`)"
                )
            time.sleep(POLL_S)
            with sessions() as session:
                rows = run_progress(session, run_id)


def failure_examples(session: Session, run_id: int, limit: int = 3) -> list[tuple[str, str]]:
    """A few (path, reason) of the run's failed images, to print next to the counts."""
    rows = session.execute(
        select(Image.path, Image.error)
        .where(Image.run_id == run_id, Image.status == "failed")
        .order_by(Image.id)
        .limit(limit)
    )
    return [(path, error or "") for path, error in rows]


def describe_progress(
    rows: Sequence[CategoryProgress], failures: Sequence[tuple[str, str]] = ()
) -> str:
    """Per category: done / failed / pending, then a few failure reasons."""
    lines = [
        f"{row.category}: {row.done} done, {row.failed} failed, {row.pending} pending"
        for row in rows
    ]
    lines += [f"  failed: {reason}" for _, reason in failures]
    return "\n".join(lines)
