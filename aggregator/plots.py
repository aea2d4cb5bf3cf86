"""PNG plots of one category's result (matplotlib's object API on the Agg canvas, no display).

Each function writes one file and returns its path, or None when the plot would be empty or
meaningless (e.g. a ROC curve with one class); the report says why instead.

Anomaly maps are patch distances, whatever the image score is (the default fused score is a
z-score), so they are coloured on their own scale (`MapScale`): one per category, anchored on
the normal images fit held out of the memory bank, so a normal region looks the same in every
image and only what no held-out normal reached turns warm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LinearSegmentedColormap, TwoSlopeNorm
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.metrics import precision_recall_curve, roc_curve

from aggregator.category_data import ImageFiles
from aggregator.evaluation import CategoryResult
from aggregator.frames import model_frame_image, model_frame_mask
from common.data.locations import to_location
from common.engine.anomaly_map import anomaly_map
from common.errors import PatchqError

DPI = 100
TOP_K = 6
COLOURS = {"normal": "#2b7bba", "anomalous": "#d7301f", "unlabelled": "#8c8c8c"}
# Anomaly-map overlay: below the top of normal a faint, see-through blue (the image shows through,
# so a normal region looks like itself); above it a jump to opaque yellow rising to red.
MAP_COLOURS = LinearSegmentedColormap.from_list(
    "patchq_anomaly",
    [
        (0.0, (0.15, 0.35, 0.9, 0.0)),
        (0.5, (0.15, 0.55, 0.95, 0.3)),
        (0.5, (1.0, 0.85, 0.0, 0.55)),
        (1.0, (0.8, 0.0, 0.0, 0.85)),
    ],
)
NORMAL_QUANTILE = 0.99  # of the held-out normals' largest patch distance: the top of "normal"


@dataclass(frozen=True)
class MapScale:
    """The colour scale of one category's anomaly maps, in patch-distance units.

    0 (a patch equal to a memory-bank patch) is the coldest colour, ``normal_top`` the middle
    of the colour map and ``2 * normal_top`` or more the hottest: normal patches are a faint
    blue, patches beyond the top of normal yellow to red.
    """

    normal_top: float
    reference: str  # what normal_top is, in words, shown above the maps

    @property
    def hottest(self) -> float:
        return 2 * self.normal_top

    def norm(self) -> TwoSlopeNorm:
        return TwoSlopeNorm(vcenter=self.normal_top, vmin=0.0, vmax=self.hottest)


def map_scale(normal_patch_maxima: np.ndarray, shown_maps: Sequence[np.ndarray]) -> MapScale:
    """The category's map scale: the held-out normals' NORMAL_QUANTILE largest patch distance.

    A normal image's smoothed map never exceeds its largest patch distance, so about 99% of
    normal images stay entirely in the cool half. Without held-out normals (fit --holdout 0)
    there is no normal reference; the scale then spans the shown maps and says so.
    """
    maxima = np.asarray(normal_patch_maxima, np.float64)
    maxima = maxima[np.isfinite(maxima)]
    if len(maxima) and maxima.max() > 0:
        top = float(np.quantile(maxima, NORMAL_QUANTILE))
        reference = f"top of normal: p99 of {len(maxima)} held-out normal images' largest distance"
        return MapScale(top, reference)
    peak = max((float(np.nanmax(m)) for m in shown_maps), default=1.0)
    return MapScale(max(peak, 1e-6) / 2, "no held-out normals: scaled to these maps")


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if figure.get_layout_engine() is None:  # figures with a colour bar lay themselves out
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
    axes.set(xlabel=result.data.score_name, ylabel="images")
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
    `patch_maps` and `files` hold (at least) those images, by id.

    Every map is coloured on the category's `MapScale` (patch distances), not on the image
    scores, which may be in other units (z-scores for the fused scorer).
    """
    data = result.data
    order = np.argsort(-data.scores, kind="stable")[:k]
    if not len(order):
        return None
    size = data.preprocessing.image_size
    heat = {int(i): anomaly_map(patch_maps[int(data.image_ids[i])], (size, size)) for i in order}
    scale = map_scale(data.normal_patch_maxima, list(heat.values()))
    figure = Figure(figsize=(1.9 * len(order) + 1.3, 2.5), layout="constrained")
    axes_row = np.atleast_1d(figure.subplots(1, len(order)))
    for axes, i in zip(axes_row, order, strict=True):
        axes.set_axis_off()
        label = {0: "normal", 1: "anomalous"}.get(int(data.labels[i]), "unlabelled")
        image = files[int(data.image_ids[i])]
        axes.set_title(f"{data.scores[i]:.3g} · {label}", fontsize=9)
        try:
            axes.imshow(model_frame_image(to_location(image.path), data.preprocessing))
        except PatchqError:
            axes.text(0.5, 0.5, "image not readable", ha="center", transform=axes.transAxes)
            continue
        axes.imshow(heat[i], cmap=MAP_COLOURS, norm=scale.norm())
        if image.mask_path:
            mask = model_frame_mask(to_location(image.mask_path), data.preprocessing)
            axes.contour(mask, levels=[0.5], colors="white", linewidths=1.2)
    _map_colour_bar(figure, axes_row, scale)
    return _save(figure, path)


def _map_colour_bar(figure: Figure, axes_row: np.ndarray, scale: MapScale) -> None:
    """A colour bar in patch distances with the top of normal marked, next to the maps."""
    bar = figure.colorbar(
        ScalarMappable(scale.norm(), MAP_COLOURS), ax=list(axes_row), fraction=0.03, pad=0.01
    )
    bar.set_ticks([0.0, scale.normal_top, scale.hottest])
    bar.set_ticklabels(["0", f"{scale.normal_top:.3g}\ntop of\nnormal", f"≥ {scale.hottest:.3g}"])
    bar.ax.tick_params(labelsize=8)
    figure.suptitle(f"colour: distance to the nearest normal patch; {scale.reference}", fontsize=9)


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
