"""The `patchq` command: one sub-command per module, each with `add_parser` and `run`.

A user-caused error (`PatchqError`) is printed as one line and exits 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from common.errors import PatchqError
from producer import (
    aggregate_command,
    config_command,
    demo_command,
    fit_command,
    flower_command,
    report_command,
    review_command,
    run_command,
    status_command,
    submit_command,
    worker_command,
)

COMMANDS: tuple[ModuleType, ...] = (
    fit_command,
    run_command,
    submit_command,
    status_command,
    worker_command,
    demo_command,
    config_command,
    aggregate_command,
    report_command,
    review_command,
    flower_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="patchq",
        description=(
            "Find defective product images with PatchCore: learn normal appearance from good "
            "images, score large archives on a fleet of workers, keep every score in SQL."
        ),
        epilog="Settings come from PATCHQ_* environment variables or ./.env.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except PatchqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; everything written so far is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
