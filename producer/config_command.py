"""`patchq config`: show the settings a patchq process on this machine would run with.

On a fleet the usual failure is one machine reading a different broker, database or queue; this
prints what this machine resolves, with passwords masked so the output can be pasted into a
ticket. `--markdown` prints the settings table of docs/operations.md, generated from the same
field metadata so the documentation cannot drift from the code.
"""

from __future__ import annotations

import argparse

from common.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the effective settings (secrets masked)",
        description=(
            "Print every setting with the value this machine resolves from the command line, "
            "the environment, ./.env and the defaults; passwords are shown as ***."
        ),
    )
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the settings table of docs/operations.md (variable, default, meaning) instead",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    print(markdown_table() if args.markdown else effective_table(Settings.load()))
    return 0


def effective_table(settings: Settings) -> str:
    """Aligned `VARIABLE  value` lines; an unset setting shows as (unset)."""
    shown = settings.masked()
    rows = [(env_var, shown[name] or "(unset)") for name, env_var, _, _ in Settings.describe()]
    width = max(len(env_var) for env_var, _ in rows)
    return "\n".join(f"{env_var:<{width}}  {value}" for env_var, value in rows)


def markdown_table() -> str:
    """The settings table of docs/operations.md: one row per setting, in declaration order."""
    lines = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for _, env_var, default, meaning in Settings.describe():
        shown_default = f"`{default}`" if default else "(unset)"
        lines.append(f"| `{env_var}` | {shown_default} | {_cell(meaning)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a bare | would start a new column)."""
    return text.replace("|", "\\|")
