"""`patchq demo`: the whole job on real images, from a fresh machine, with one command.

The data are solar-cell electroluminescence images from the PyPI package `elpv-dataset`
(Deitsch et al., CC BY-NC-SA 4.0), written in the seed layout with two categories, mono and
poly. The demo runs the same pipeline as `patchq run`, with each category's answer key for
test/ as `--labels`, and ends with each category's figures on those test cells: images that
neither the memory bank, the calibration nor `--auto`'s choice saw.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from producer.demo_data import CATEGORIES, write_elpv_demo
from producer.fit_command import add_model_arguments, settings_from_args
from producer.run_command import add_run_arguments, run_from_args

DEFAULT_ROOT = Path("demo-data")
DEFAULT_LIMIT = 400


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="write the solar-cell demo data set and run the whole job on it",
        description=(
            "Write a real data set (elpv-dataset solar cells, CC BY-NC-SA 4.0) in the seed layout "
            "and run patchq on it end to end: fit, score, aggregate (in-process on SQLite unless "
            "PATCHQ_BROKER_URL is set). Each category's answer key for test/ (test_labels.csv, "
            "cells the annotators were unsure about left unlabelled) labels the run unless "
            "--labels says otherwise, so the summary judges the models on cells fit never saw."
        ),
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where to write the data")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"cells per category (default {DEFAULT_LIMIT}; 0 = all ~1,000-1,500)",
    )
    add_run_arguments(parser)
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    root = write_elpv_demo(args.root, limit_per_category=args.limit or None)
    print(f"demo data: {root} (elpv-dataset, CC BY-NC-SA 4.0)")
    if args.labels is None:  # the answer key judges the models on test/, which fit never sees
        keys = [root / category / "test_labels.csv" for category in args.category or CATEGORIES]
        args = argparse.Namespace(**vars(args) | {"labels": keys})
    run_from_args(root, args, settings)
    return 0
