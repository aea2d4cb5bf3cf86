"""CSV exports: one predictions file per category and a summary of all categories.

Plain CSV so the results open in a spreadsheet or pandas without patchq installed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from aggregator.evaluation import CategoryResult

PREDICTION_COLUMNS = ("path", "score", "label", "prediction", "threshold", "policy", "role")
SUMMARY_FILE = "summary.csv"
PREDICTIONS_FILE = "predictions.csv"


def category_dir(out_dir: Path, category: str) -> Path:
    """A folder name safe on every filesystem and in a relative URL."""
    return out_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", category).strip("._") or "category")


def write_category_csv(result: CategoryResult, out_dir: Path) -> Path:
    """<out>/<category>/predictions.csv, worst first; label is empty when unknown."""
    path = category_dir(out_dir, result.data.category) / PREDICTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = result.data
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        for i in sorted(range(len(data.paths)), key=lambda i: -data.scores[i]):
            writer.writerow(
                (
                    data.paths[i],
                    f"{data.scores[i]:.6g}",
                    "" if data.labels[i] < 0 else int(data.labels[i]),
                    int(result.predictions[i]),
                    f"{result.choice.value:.6g}",
                    result.policy.name,
                    result.sets.roles[i],
                )
            )
    return path


def write_summary_csv(results: Sequence[CategoryResult], out_dir: Path) -> Path:
    """<out>/summary.csv: one row per category, the same figures as the terminal table."""
    path = out_dir / SUMMARY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.summary_row() for r in results]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["category"])
        writer.writeheader()
        writer.writerows(rows)
    return path
