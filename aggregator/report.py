"""`write_report`: one static HTML page per run, with plots, that works offline.

The page is plain HTML with inline CSS: no script, no CDN, images referenced by relative paths,
so the folder can be zipped, mailed, or opened from a file share. The run is re-aggregated
with the policy each category last used, so the page always matches the database.
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from aggregator import plots
from aggregator.aggregate import RunSummary, aggregate_run, default_out_dir, latest_policies
from aggregator.category_data import image_files, load_patch_maps
from aggregator.console import SUMMARY_COLUMNS
from aggregator.evaluation import CategoryResult
from aggregator.exports import PREDICTIONS_FILE, SUMMARY_FILE, category_dir
from common.store.run_rows import resolve_run
from common.store.schema import Score
from common.store.score_rows import decode_array

INDEX_FILE = "index.html"
PCA_MAX_POINTS = 2000  # a scatter of more points says nothing more and slows the page

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
section { border-top: 2px solid #444; margin-top: 2rem; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figure { display: inline-block; vertical-align: top; margin: 0.4rem 0.8rem 0.8rem 0; }
figcaption { font-size: 0.85rem; color: #555; }
.sets { background: #f7f7f2; padding: 0.5rem 0.8rem; border-left: 4px solid #b8a; }
.note { color: #8a4b00; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; }
.muted { color: #777; }
"""


def write_report(engine: Engine, run_id: int | str, out_dir: Path | None = None) -> Path:
    """Aggregate (same policies as last time), plot, and write <out>/index.html; returns it."""
    with Session(engine) as session:
        run_id, run_name = resolve_run(session, run_id)
        policies = latest_policies(session, run_id)
    out = out_dir or default_out_dir(run_id, run_name)
    summary = aggregate_run(engine, run_id, out_dir=out, echo=None, policy_for=policies.get)
    return render_report(engine, summary)


def render_report(engine: Engine, summary: RunSummary) -> Path:
    """Plot an aggregation just computed and write <summary.out_dir>/index.html; returns it."""
    out, run_id, run_name = summary.out_dir, summary.run_id, summary.run_name
    with Session(engine) as session:
        sections = [_category_section(session, result, out) for result in summary.results]
    title = f"patchq run {run_id}" + (f" ({run_name})" if run_name else "")
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="muted">generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from the '
            f'results database · <a href="{SUMMARY_FILE}">{SUMMARY_FILE}</a></p>',
            "<h2>Summary</h2>",
            "<p>Each threshold was chosen on a <b>calibration</b> set; the figures are measured "
            "on a separate <b>evaluation</b> set (see each category).</p>",
            _summary_table(summary.results),
            *sections,
            "</body></html>",
        ]
    )
    index = out / INDEX_FILE
    index.write_text(page, encoding="utf-8")
    return index


def _cell(value: object, digits: int | None) -> str:
    if value is None:
        return "n/a"
    return html.escape(str(value) if digits is None else f"{value:.{digits}f}")


def _summary_table(results: list[CategoryResult]) -> str:
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _, _ in SUMMARY_COLUMNS)
    rows = []
    for result in results:
        row = result.summary_row()
        anchor = category_dir(Path(), result.data.category).name
        cells = [f'<td><a href="#{anchor}">{html.escape(result.data.category)}</a></td>']
        cells += [f"<td>{_cell(row[key], digits)}</td>" for _, key, digits in SUMMARY_COLUMNS[1:]]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _embeddings(session: Session, result: CategoryResult) -> dict[int, np.ndarray]:
    """Pooled embeddings of up to PCA_MAX_POINTS images (a seeded sample of bigger runs)."""
    ids = result.data.image_ids
    if len(ids) > PCA_MAX_POINTS:
        ids = np.random.default_rng(0).choice(ids, PCA_MAX_POINTS, replace=False)
    found: dict[int, np.ndarray] = {}
    for start in range(0, len(ids), 500):
        chunk = [int(i) for i in ids[start : start + 500]]
        for image_id, data in session.execute(
            select(Score.image_id, Score.embedding).where(
                Score.run_id == result.data.run_id,
                Score.image_id.in_(chunk),
                Score.embedding.is_not(None),
            )
        ):
            found[image_id] = decode_array(data, (-1,))
    return found


def _category_section(session: Session, result: CategoryResult, out: Path) -> str:
    data = result.data
    folder = category_dir(out, data.category)
    top = np.argsort(-data.scores, kind="stable")[: plots.TOP_K]
    figures = {
        "ROC and precision-recall curves (evaluation set)": plots.roc_pr_curves(
            result, folder / "roc_pr.png"
        ),
        "confusion matrix (evaluation set)": plots.confusion_heatmap(
            result, folder / "confusion.png"
        ),
        "score distributions": plots.score_histogram(result, folder / "histogram.png"),
        f"top {len(top)} most anomalous images (anomaly map: blue within the held-out normals' "
        "patch distances, yellow to red beyond them; white: ground-truth mask)": (
            plots.top_anomalies(
                result,
                load_patch_maps(session, data.run_id, data.image_ids[top].tolist()),
                image_files(session, data.image_ids[top].tolist()),
                folder / "top_anomalies.png",
            )
        ),
        "pooled embeddings, 2-D PCA (colour: label, marker: role)": plots.embedding_pca(
            result, _embeddings(session, result), folder / "pca.png"
        ),
    }
    row = result.summary_row()
    parts = [
        f'<section id="{folder.name}"><h2>{html.escape(data.category)}</h2>',
        f"<p>policy <b>{html.escape(result.policy.label)}</b>: threshold "
        f"<b>{result.choice.value:.4g}</b>; {row['n_flagged']} of {row['n_images']} scored "
        f'images flagged anomalous · <a href="{folder.name}/{PREDICTIONS_FILE}">'
        f"{PREDICTIONS_FILE}</a></p>",
        f'<p class="sets"><b>calibration</b> (threshold chosen on): '
        f"{html.escape(row['calibration_set'])}<br><b>evaluation</b> (figures from): "
        f"{html.escape(row['evaluation_set'])}</p>",
    ]
    if data.model_choice:
        parts.append(f"<p>model: {html.escape(data.model_choice)}</p>")
    if result.choice.note:
        parts.append(f'<p class="note">{html.escape(result.choice.note)}</p>')
    if data.n_failed or data.n_pending:
        parts.append(f"<p>not scored: {data.n_failed} failed, {data.n_pending} pending</p>")
    if result.ranking and result.ranking.undefined_reason:
        parts.append(f"<p>AUROC undefined: {html.escape(result.ranking.undefined_reason)}</p>")
    if result.report:
        parts.append(f"<pre>{html.escape(result.report)}</pre>")
    if result.pixel is not None:
        parts.append(
            f"<p>pixel AUROC {_cell(result.pixel.pixel_auroc, 3)} · AUPRO (FPR ≤ 0.3) "
            f"{_cell(result.pixel.aupro, 3)} over {result.pixel.n_images} labelled images</p>"
        )
    for caption, path in figures.items():
        if path is not None:
            src = path.relative_to(out).as_posix()
            parts.append(
                f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("</section>")
    return "\n".join(parts)
