"""How a figure reads wherever patchq prints one, so fit, run and aggregate agree."""

from __future__ import annotations


def format_figure(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals; "n/a" where the figure is undefined (no defects to rank,
    no held-out images), which is news to the reader, not a zero."""
    return "n/a" if value is None else f"{value:.{digits}f}"
