"""`patchq aggregate RUN`: thresholds, predictions and metrics per category, from the database."""

from __future__ import annotations

import argparse
from pathlib import Path

from aggregator.policy_names import DEFAULT_LABELLED_POLICY, DEFAULT_UNLABELLED_POLICY, POLICY_HELP
from common.settings import Settings
from common.store.connection import open_database


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aggregate",
        help="choose thresholds, store predictions and metrics for a run",
        description=(
            "Per category of RUN: choose a threshold on a calibration set, report metrics on a "
            "separate evaluation set, store thresholds, metrics and predictions in the database, "
            "and write CSVs (one per category plus summary.csv)."
        ),
    )
    parser.add_argument("run_ref", metavar="RUN", help="run id or name")
    parser.add_argument(
        "--policy",
        help=f"threshold policy: {POLICY_HELP}. Default: {DEFAULT_LABELLED_POLICY} where both "
        f"classes are labelled, else {DEFAULT_UNLABELLED_POLICY}",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the CSVs (default: patchq-reports/run-<id>[-<name>])"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.aggregate import aggregate_run  # here: --help must not load the metrics

    with open_database(Settings.load().database_url) as (engine, _):
        aggregate_run(engine, args.run_ref, args.policy, args.out)
    return 0
