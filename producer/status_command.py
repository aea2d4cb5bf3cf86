"""`patchq status RUN`: where a run stands, read from the database alone.

Counts per category, throughput from the scores' timestamps and an ETA from the pending count,
then the workers (producer.fleet_status); no broker, Flower or result backend is asked, so
status works from any machine that can read the database, and stays right across broker
restarts.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from tqdm import tqdm

from common.settings import Settings
from common.store.connection import open_database
from common.store.run_rows import CategoryProgress, resolve_run, run_progress
from producer.fleet_status import fleet_report
from producer.progress import describe_progress, failure_examples, wait_for_run

BAR_COLUMNS = 100
MIN_SPAN_S = 1.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="progress of a run: done/failed/pending per category, throughput, ETA",
        description="Show a run's progress per category from the database (PATCHQ_DATABASE_URL).",
    )
    parser.add_argument("run_ref", metavar="RUN", help="run name or id")
    parser.add_argument(
        "--watch", action="store_true", help="follow the run until nothing is pending"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load()
    with open_database(settings.database_url) as (_, sessions):
        with sessions() as session:
            run_id, _ = resolve_run(session, args.run_ref)
        if args.watch:
            wait_for_run(sessions, run_id)
        with sessions() as session:
            rows = run_progress(session, run_id)
            failures = failure_examples(session, run_id)
            pending = sum(row.pending for row in rows)
            fleet = fleet_report(
                session,
                run_id,
                pending,
                settings.heartbeat_s,
                settings.lease_s,
                settings.broker_url is not None,
            )
    print(f"run {args.run_ref} (id {run_id})")
    print(progress_table(rows, with_rate=not fleet.waiting))
    print(describe_progress(rows, failures))
    print("\n".join(fleet.lines))
    return 0


def progress_table(rows: Sequence[CategoryProgress], with_rate: bool = True) -> str:
    """One tqdm-style bar per category, plus a total line when there are several.

    Without the rate (images wait on a lost worker) the bars show no ETA: one computed from
    past throughput would promise a finish that the wait for the requeue postpones.
    """
    lines = [_bar(row.category, [row], with_rate) for row in rows]
    if len(rows) > 1:
        lines.append(_bar("all", rows, with_rate))
    return "\n".join(lines)


def _bar(label: str, rows: Sequence[CategoryProgress], with_rate: bool) -> str:
    """Bar of finished/total; the rate is scored images over the span they were scored in."""
    done = sum(r.done for r in rows)
    finished = sum(r.done + r.failed for r in rows)
    firsts = [r.first_scored_at for r in rows if r.first_scored_at]
    lasts = [r.last_scored_at for r in rows if r.last_scored_at]
    elapsed = (max(lasts) - min(firsts)).total_seconds() if firsts else 0.0
    if elapsed < MIN_SPAN_S or not with_rate:  # a single batch says nothing about throughput
        elapsed = 0.0
    rate = done / elapsed if elapsed else None
    return tqdm.format_meter(
        finished,
        sum(r.total for r in rows),
        elapsed,
        ncols=BAR_COLUMNS,
        prefix=label,
        unit="img",
        rate=rate,
    )
