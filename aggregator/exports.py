"""CSV exports: one predictions file per category and a summary of all categories.

Plain CSV so the results open in a spreadsheet or pandas without patchq installed.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from aggregator.evaluation import CategoryResult
from common.store.aggregate_schema import Prediction
from common.store.schema import Image

PREDICTION_COLUMNS = ("path", "score", "label", "prediction", "threshold", "policy", "role")
SUMMARY_FILE = "summary.csv"
PREDICTIONS_FILE = "predictions.csv"
STREAM_ROWS = 50_000  # rows fetched at a time when writing a predictions file


def category_dir(out_dir: Path, category: str) -> Path:
    """A folder name safe on every filesystem and in a relative URL."""
    return out_dir / (re.sub(r"[^A-Za-z0-9._-]+", "_", category).strip("._") or "category")


def write_category_csv(session: Session, result: CategoryResult, out_dir: Path) -> Path:
    """<out>/<category>/predictions.csv, worst first; label is empty when unknown.

    Streamed from the stored predictions joined to their images (the paths are read here and
    nowhere else), so a category of millions of images is written in constant memory.
    """
    path = category_dir(out_dir, result.data.category) / PREDICTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data, threshold = result.data, f"{result.choice.value:.6g}"
    rows = session.execute(
        select(Image.path, Prediction.score, Image.label, Prediction.is_anomaly, Prediction.role)
        .join(Image, Image.id == Prediction.image_id)
        .where(
            Prediction.run_id == data.run_id,
            Prediction.category == data.category,
            Prediction.policy == result.policy.name,
        )
        .order_by(Prediction.score.desc(), Prediction.image_id)
        .execution_options(yield_per=STREAM_ROWS)
    )
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows(
            (image_path, f"{score:.6g}", "" if label is None else label, int(flag), threshold,
             result.policy.name, role)
            for image_path, score, label, flag, role in rows
        )  # fmt: skip
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
