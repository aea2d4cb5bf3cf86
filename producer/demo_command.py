"""`patchq demo`: the whole job on real images, from a fresh machine, with one command.

The data are solar-cell electroluminescence images from the PyPI package `elpv-dataset`
(Deitsch et al., CC BY-NC-SA 4.0), written in the seed layout with two categories, mono and poly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.layouts import discover, summarize
from common.settings import Settings
from producer.demo_data import write_elpv_demo
from producer.fit_command import add_model_arguments, config_from_args, fit_and_store

DEFAULT_ROOT = Path("demo-data")
DEFAULT_LIMIT = 400


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="write the solar-cell demo data set and run the whole job on it",
        description=(
            "Write a real data set (elpv-dataset solar cells, CC BY-NC-SA 4.0) in the seed layout "
            "and run patchq on it end to end on the embedded default (SQLite, in-process)."
        ),
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where to write the data")
    parser.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"cells per category (default {DEFAULT_LIMIT}; 0 = all ~1,000-1,500)",
    )
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load({"device": args.device})
    root = write_elpv_demo(args.root, limit_per_category=args.limit or None)
    print(f"demo data: {root} (elpv-dataset, CC BY-NC-SA 4.0)")
    records = discover(root, args.category)
    print(summarize(records))
    fit_and_store(records, config_from_args(args), settings, args.holdout, args.batch_size)
    return 0
