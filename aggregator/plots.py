"""PNG plots of one category's result (matplotlib's object API on the Agg canvas, no display).

Each function writes one file and returns its path, or None when the plot would be empty or
meaningless (e.g. a ROC curve with one class); the report says why instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.metrics import precision_recall_curve, roc_curve

from aggregator.category_data import ImageFiles
from aggregator.evaluation import CategoryResult
from aggregator.frames import model_frame_image, model_frame_mask
from common.engine.anomaly_map import anomaly_map
from common.errors import PatchqError

DPI = 100
TOP_K = 6
COLOURS = {"normal": "#2b7bba", "anomalous": "#d7301f", "unlabelled": "#8c8c8c"}


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def roc_pr_curves(result: CategoryResult, path: Path) -> Path | None:
    """ROC and precision-recall curves of the evaluation set, AUCs in the legends."""
    ranking = result.ranking
    if ranking is None or ranking.auroc is None:
        return None
    labels, scores = result.sets.evaluation_labels, result.sets.evaluation_scores
    figure = Figure(figsize=(9, 4))
    roc, pr = figure.subplots(1, 2)
    fpr, tpr, _ = roc_curve(labels, scores)
    roc.plot(fpr, tpr, color=COLOURS["anomalous"], label=f"AUROC = {ranking.auroc:.3f}")
    roc.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="chance")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    precision, recall, _ = precision_recall_curve(labels, scores)
    pr.step(
        recall,
        precision,
        where="post",
        color=COLOURS["normal"],
        label=f"AP = {ranking.average_precision:.3f}",
    )
    pr.axhline(labels.mean(), linestyle="--", color="grey", linewidth=1, label="prevalence")
    pr.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
    for axes in (roc, pr):
        axes.legend(loc="lower right" if axes is roc else "lower left")
    return _save(figure, path)


def confusion_heatmap(result: CategoryResult, path: Path) -> Path | None:
    m = result.at_threshold
    if m is None:
        return None
    figure = Figure(figsize=(4, 3.6))
    axes = figure.subplots()
    matrix = m.confusion
    axes.imshow(matrix, cmap="Blues", vmin=0)
    for (row, column), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        axes.text(
            column,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if dark else "black",
            fontsize=14,
        )
    axes.set_xticks([0, 1], ["normal", "anomalous"])
    axes.set_yticks([0, 1], ["normal", "anomalous"])
    axes.set(xlabel="predicted", ylabel="true", title=f"threshold {m.threshold:.4g}")
    return _save(figure, path)


def score_histogram(result: CategoryResult, path: Path) -> Path:
    """Evaluation normals vs anomalies, and the unlabelled images, with the threshold line."""
    labels, scores = result.sets.evaluation_labels, result.sets.evaluation_scores
    unlabelled = result.data.scores[result.sets.roles == "unlabelled"]
    groups = {
        "normal": scores[labels == 0],
        "anomalous": scores[labels == 1],
        "unlabelled": unlabelled,
    }
    everything = np.concatenate([result.data.scores, scores])
    bins = np.histogram_bin_edges(everything, bins=30)
    figure = Figure(figsize=(7, 3.6))
    axes = figure.subplots()
    for name, values in groups.items():
        if len(values):
            axes.hist(
                values, bins=bins, alpha=0.55, color=COLOURS[name], label=f"{name} ({len(values)})"
            )
    axes.axvline(
        result.choice.value,
        color="black",
        linestyle="--",
        label=f"threshold {result.choice.value:.4g}",
    )
    axes.set(xlabel="image score (max patch distance)", ylabel="images")
    axes.legend()
    return _save(figure, path)


def top_anomalies(
    result: CategoryResult,
    patch_maps: Mapping[int, np.ndarray],
    files: Mapping[int, ImageFiles],
    path: Path,
    k: int = TOP_K,
) -> Path | None:
    """The k highest-scoring images with their anomaly maps over them and mask contours;
    `patch_maps` and `files` hold (at least) those images, by id."""
    data = result.data
    order = np.argsort(-data.scores, kind="stable")[:k]
    if not len(order):
        return None
    size = data.preprocessing.image_size
    figure = Figure(figsize=(2.4 * len(order), 2.8))
    axes_row = np.atleast_1d(figure.subplots(1, len(order)))
    for axes, i in zip(axes_row, order, strict=True):
        axes.set_axis_off()
        label = {0: "normal", 1: "anomalous"}.get(int(data.labels[i]), "unlabelled")
        image = files[int(data.image_ids[i])]
        axes.set_title(f"{data.scores[i]:.3g} · {label}", fontsize=9)
        try:
            axes.imshow(model_frame_image(Path(image.path), data.preprocessing))
        except PatchqError:
            axes.text(0.5, 0.5, "image not readable", ha="center", transform=axes.transAxes)
            continue
        heat = anomaly_map(patch_maps[int(data.image_ids[i])], (size, size))
        axes.imshow(
            heat,
            cmap="jet",
            alpha=0.45,
            vmin=result.data.scores.min(),
            vmax=max(float(data.scores.max()), float(heat.max())),
        )
        if image.mask_path:
            mask = model_frame_mask(Path(image.mask_path), data.preprocessing)
            axes.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
    return _save(figure, path)


def embedding_pca(
    result: CategoryResult, embeddings: Mapping[int, np.ndarray], path: Path
) -> Path | None:
    """2-D PCA of the pooled image embeddings: colour = label, marker = role (split)."""
    data = result.data
    index = [i for i, image_id in enumerate(data.image_ids) if int(image_id) in embeddings]
    if len(index) < 3:
        return None
    points = PCA(n_components=2, random_state=0).fit_transform(
        np.stack([embeddings[int(data.image_ids[i])] for i in index])
    )
    labels = np.array(
        [{0: "normal", 1: "anomalous"}.get(int(data.labels[i]), "unlabelled") for i in index]
    )
    roles = result.sets.roles[index]
    markers = {"calibration": "s", "evaluation": "o", "unlabelled": "^", "excluded": "x"}
    figure = Figure(figsize=(6, 4.5))
    axes = figure.subplots()
    for role, marker in markers.items():
        for label, colour in COLOURS.items():
            chosen = (roles == role) & (labels == label)
            if chosen.any():
                axes.scatter(
                    *points[chosen].T,
                    c=colour,
                    marker=marker,
                    s=28,
                    alpha=0.8,
                    label=f"{label}, {role}",
                )
    axes.set(xlabel="PC 1", ylabel="PC 2", title="pooled embeddings (PCA)")
    axes.legend(fontsize=8, loc="best")
    return _save(figure, path)
