"""`patchq report RUN`: plots and one offline HTML page for a run; prints the page's path."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.settings import Settings
from common.store.connection import open_database


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write the HTML report of a run (plots, tables) and print its path",
        description=(
            "Re-aggregate RUN with the threshold policy each category last used (the default "
            "policy if never aggregated) and write a static HTML page with plots that works "
            "offline: DIR/index.html, next to the CSVs."
        ),
    )
    parser.add_argument("run_ref", metavar="RUN", help="run id or name")
    parser.add_argument(
        "--out", type=Path, help="report folder (default: patchq-reports/run-<id>[-<name>])"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from aggregator.report import write_report  # here: --help must not load plotting

    with open_database(Settings.load().database_url) as (engine, _):
        print(write_report(engine, args.run_ref, args.out))
    return 0
