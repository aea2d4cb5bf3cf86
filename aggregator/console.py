"""What `patchq aggregate` prints: one block per category and the summary table."""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.evaluation import CategoryResult
from common.formatting import format_figure


def describe_category(result: CategoryResult) -> str:
    """The terminal block of one category: sets, threshold, classification report, matrix."""
    data, row = result.data, result.summary_row()
    lines = [
        f"\n== {data.category} — policy {result.policy.label}: threshold {result.choice.value:.4g}",
        f"   calibration (threshold chosen on): {row['calibration_set']}",
        f"   evaluation (figures below from):   {row['evaluation_set']}",
    ]
    if data.n_review_labels:
        lines.append(
            f"   labels from verdicts: {data.n_review_labels} "
            "(`patchq review`, `patchq run --labels` answer keys)"
        )
    if result.choice.note:
        lines.append(f"   note: {result.choice.note}")
    if data.n_failed or data.n_pending:
        lines.append(f"   not scored: {data.n_failed} failed, {data.n_pending} pending")
    if result.at_threshold is None:
        lines.append("   no labelled images to evaluate on")
    else:
        m = result.at_threshold
        reason = result.ranking.undefined_reason if result.ranking else None
        lines += [
            "",
            result.report.rstrip(),
            "",
            f"   AUROC {format_figure(row['auroc'])}  "
            f"AP {format_figure(row['average_precision'])}" + (f"  ({reason})" if reason else ""),
            f"   specificity {format_figure(m.specificity)}  "
            f"balanced accuracy {format_figure(m.balanced_accuracy)}  MCC {format_figure(m.mcc)}",
            "   confusion matrix      predicted normal  predicted anomalous",
            f"     true normal       {m.tn:>16}  {m.fp:>19}",
            f"     true anomalous    {m.fn:>16}  {m.tp:>19}",
        ]
    if result.pixel is not None:
        lines.append(
            f"   pixel AUROC {format_figure(result.pixel.pixel_auroc)}  "
            f"AUPRO@0.3 {format_figure(result.pixel.aupro)}"
            f"  ({result.pixel.n_images} labelled images, threshold-free)"
        )
    lines.append(
        f"   predictions: {row['n_flagged']} of {row['n_images']} scored images flagged anomalous"
    )
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    ("category", "category", None),
    ("policy", "policy", None),
    ("threshold", "threshold", 4),
    ("flagged", "n_flagged", None),
    ("images", "n_images", None),
    ("AUROC", "auroc", 3),
    ("AP", "average_precision", 3),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("F1", "f1", 3),
    ("px AUROC", "pixel_auroc", 3),
    ("AUPRO", "aupro", 3),
)


def summary_table(results: Sequence[CategoryResult]) -> str:
    """All categories in one aligned table (evaluation-set figures)."""
    cells = [[title for title, _, _ in SUMMARY_COLUMNS]]
    for result in results:
        row = result.summary_row()
        cells.append(
            [
                str(row[key]) if digits is None else format_figure(row[key], digits)
                for _, key, digits in SUMMARY_COLUMNS
            ]
        )
    widths = [max(len(r[i]) for r in cells) for i in range(len(SUMMARY_COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\nsummary (figures on each category's evaluation set)\n" + "\n".join(lines)
