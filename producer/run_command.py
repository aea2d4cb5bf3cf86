"""`patchq run`: the whole job in one command, fit -> submit -> score -> aggregate.

With no broker configured (PATCHQ_BROKER_URL unset) everything runs in this process on the
database of PATCHQ_DATABASE_URL (a SQLite file by default), with the same scoring function the
workers run. With a broker, the batches go to `patchq worker` processes and this command waits,
following progress in the database.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from aggregator.policy_names import POLICY_HELP
from common.data.locations import Location, to_location
from common.settings import Settings
from producer.fit_command import add_model_arguments, plan_from_args, settings_from_args
from producer.submission import SPLITS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="fit (if needed), score and aggregate a data set in one go",
        description=(
            "Fit a model for each category that has none yet, score the data set's images "
            "(in-process, or on workers when PATCHQ_BROKER_URL is set), then choose thresholds "
            "and compute metrics per category."
        ),
    )
    parser.add_argument(
        "data",
        type=to_location,
        metavar="DATA",
        help="data root (seed or MVTec layout): a folder or s3://bucket/root",
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of the scoring and aggregation steps, shared with `patchq demo`."""
    group = parser.add_argument_group("run")
    group.add_argument(
        "--run", dest="run_name", help="run name (default run-<UTC time>); a known name continues"
    )
    group.add_argument(
        "--split",
        choices=SPLITS,
        default="all",
        help="images to score (default all: labelled train/bad defects count in the metrics; "
        "memory-bank images never do)",
    )
    group.add_argument("--policy", help=f"threshold policy: {POLICY_HELP}")
    group.add_argument(
        "--labels",
        type=Path,
        action="append",
        metavar="FILE",
        help="answer key for images fit never sees (a seed layout's test/): a .csv/.txt manifest "
        "of paths with a label column (0/1 or good/bad); its labels are recorded as verdicts "
        "before aggregating (repeatable)",
    )
    group.add_argument("--out", type=Path, help="folder for predictions and the summary")
    group.add_argument("--refit", action="store_true", help="fit new models even where one exists")


def run(args: argparse.Namespace) -> int:
    run_from_args(args.data, args, settings_from_args(args))
    return 0


def run_from_args(data: Location, args: argparse.Namespace, settings: Settings) -> None:
    """The whole pipeline on `data` as the run and model flags say (run and demo)."""
    from producer.pipeline import FitOptions, run_pipeline  # here: --help must not load torch

    run_pipeline(
        data,
        args.category,
        settings,
        fit_options=FitOptions(plan_from_args(args), refit=args.refit),
        run_name=args.run_name,
        split=args.split,
        policy=args.policy,
        out_dir=args.out,
        answer_keys=args.labels or (),
    )
