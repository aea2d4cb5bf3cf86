"""`aggregate_run`: per category of a run, a threshold, predictions and honest metrics, from SQL.

Reading lives in `category_data`, the calibration/evaluation rules in `evaluation`, the printed
tables in `console`, the files in `exports`; this module runs them and stores the results.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from aggregator.category_data import category_pixel_metrics, load_category, scored_categories
from aggregator.console import describe_category, summary_table
from aggregator.evaluation import AggregateError, CategoryResult, evaluate_category, resolve_policy
from aggregator.exports import write_category_csv, write_summary_csv
from common.store.aggregate_schema import Metric, Prediction, Threshold
from common.store.bulk import append_rows
from common.store.run_rows import resolve_run

DEFAULT_REPORTS_DIR = Path("patchq-reports")

Echo = Callable[[str], None]
# Streamed by append_rows (COPY on PostgreSQL), in this order.
PREDICTION_COLUMNS = ("run_id", "image_id", "policy", "category", "score", "is_anomaly", "role")


@dataclass(frozen=True)
class RunSummary:
    run_id: int
    run_name: str | None
    results: list[CategoryResult]
    out_dir: Path
    summary_csv: Path
    category_csvs: dict[str, Path]


def default_out_dir(run_id: int, run_name: str | None) -> Path:
    return DEFAULT_REPORTS_DIR / (
        f"run-{run_id}" if run_name is None else f"run-{run_id}-{run_name}"
    )


def compute_run(
    session: Session, run_id: int, policy_for: Callable[[str], str | None]
) -> list[CategoryResult]:
    """Every scored category's result; `policy_for(category)` gives its policy (None: default)."""
    categories = scored_categories(session, run_id)
    if not categories:
        raise AggregateError(
            f"run {run_id} has no scored images yet; check `patchq status {run_id}`"
        )
    results = []
    for category in categories:
        data = load_category(session, run_id, category)
        result = evaluate_category(data, resolve_policy(policy_for(category), data))
        results.append(replace(result, pixel=category_pixel_metrics(session, data)))
    return results


def store_result(session: Session, result: CategoryResult) -> None:
    """Replace this (run, category, policy)'s threshold, metrics and predictions."""
    data, policy = result.data, result.policy.name
    key = (data.run_id, data.category, policy)
    for table in (Prediction, Metric, Threshold):
        session.execute(
            delete(table).where(
                table.run_id == key[0], table.category == key[1], table.policy == key[2]
            )
        )
    row = result.summary_row()
    session.add(
        Threshold(
            run_id=data.run_id,
            category=data.category,
            policy=policy,
            value=result.choice.value,
            calibration_set=row["calibration_set"],
            evaluation_set=row["evaluation_set"],
            note=row["note"],
        )
    )
    session.flush()
    metric_columns = {c.name for c in Metric.__table__.columns}
    session.add(
        Metric(
            run_id=data.run_id,
            **{k: v for k, v in row.items() if k in metric_columns and k != "run_id"},
            undefined_reason=result.ranking.undefined_reason if result.ranking else None,
            report=result.report,
        )
    )
    session.flush()
    append_rows(
        session,
        Prediction.__tablename__,
        PREDICTION_COLUMNS,
        (
            (data.run_id, int(image_id), policy, data.category, float(score), bool(flag), role)
            for image_id, score, flag, role in zip(
                data.image_ids, data.scores, result.predictions, result.sets.roles, strict=True
            )
        ),
    )


def latest_policies(session: Session, run_id: int) -> dict[str, str]:
    """The policy each category was last aggregated with."""
    rows = session.execute(
        select(Threshold.category, Threshold.policy)
        .where(Threshold.run_id == run_id)
        .order_by(Threshold.created_at)
    )
    return {category: policy for category, policy in rows}


def aggregate_run(
    engine: Engine,
    run_id: int | str,
    policy: str | None = None,
    out_dir: Path | None = None,
    echo: Echo | None = print,
    policy_for: Callable[[str], str | None] | None = None,
) -> RunSummary:
    """Aggregate every category of a run (id or name): store results, write CSVs, print tables.

    `policy` applies to every category (None: youden where both classes are labelled, else
    normal_quantile:0.99); `policy_for` overrides it per category. `echo=None` prints nothing.
    """
    with Session(engine) as session, session.begin():
        run_id, run_name = resolve_run(session, run_id)
        results = compute_run(session, run_id, policy_for or (lambda _category: policy))
        for result in results:
            store_result(session, result)
    out = out_dir or default_out_dir(run_id, run_name)
    with Session(engine) as session:
        csvs = {r.data.category: write_category_csv(session, r, out) for r in results}
    summary_csv = write_summary_csv(results, out)
    if echo:
        for result in results:
            echo(describe_category(result))
        echo(summary_table(results))
        echo(f"predictions: {out}/<category>/predictions.csv; summary: {summary_csv}")
    return RunSummary(run_id, run_name, results, out, summary_csv, csvs)
