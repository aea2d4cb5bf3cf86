"""Fit a PatchCore model for one category, with calibration on images the bank never saw.

The seed notebook built its memory bank from every good image and then scored those same
images, reporting a perfect AUROC of 1.0: a bank image's patches are in the bank, so their
distance is ~0. Here a seeded share of the good images is held out of the bank; they and the
labelled defects are the only images that validation figures and thresholds come from.

The whole-image parts (engine/global_scorer.py) are fitted on the pooled statistics of the same
bank features and on the bank images' already decoded pixels, and the held-out normals' raw part
scores calibrate the fused score.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from tqdm import tqdm

from common.data.batches import iter_batches
from common.data.layouts import ImageRecord
from common.engine.calibration import calibrated, combine_parts
from common.engine.coreset import (
    CHUNK_ROWS,
    ApproximateGreedyCoresetSampler,
    ChunkedSelection,
    RandomSubsampler,
)
from common.engine.global_scorer import GlobalScorer, image_statistics, pooled_statistics
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import (
    PatchCore,
    ScoreBatch,
    build_extractor,
    extract_patches,
    resolve_device,
    search_vectors,
)
from common.engine.position_search import grid_positions
from common.errors import PatchqError

DEFAULT_HOLDOUT = 0.2


class FitError(PatchqError):
    """Not enough usable images to build and validate a model."""


@dataclass(frozen=True)
class FitResult:
    """A fitted model plus the evidence that its figures are honest."""

    category: str
    model: PatchCore
    validation: dict[str, Any]
    bank_paths: frozenset[Path]
    validation_paths: frozenset[Path]
    skipped: dict[Path, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # Final image scores of the validation images: "normal" (held-out first), "anomalous".
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    # Their raw (n, parts) [s*, global(, pixel)] scores, same keys and order, from which any
    # scorer or fusion of this model can be evaluated without scoring again.
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    # The image of each row of `parts` (unreadable images have no row), same keys: what a
    # choice made on some rows (--auto) must keep out of later evaluations.
    row_paths: dict[str, tuple[Path, ...]] = field(default_factory=dict)
    # The defect kind (ImageRecord.defect_type) of each "anomalous" row: --auto gives every
    # kind its share of each half its figure is cross-fitted on.
    defect_kinds: tuple[str, ...] = ()


def split_holdout(
    good: Sequence[ImageRecord], share: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split good images into (bank, held-out) with a seeded shuffle; both keep at least one."""
    if not 0 <= share < 1:
        raise FitError(f"holdout share must be in [0, 1), got {share}; e.g. --holdout 0.2")
    order = np.random.default_rng(seed).permutation(len(good))
    n_holdout = round(share * len(good))
    if share > 0 and len(good) >= 2:
        n_holdout = min(max(n_holdout, 1), len(good) - 1)
    held = {int(i) for i in order[:n_holdout]}
    bank = [r for i, r in enumerate(good) if i not in held]
    return bank, [r for i, r in enumerate(good) if i in held]


def fit_category(
    records: Sequence[ImageRecord],
    config: PatchCoreConfig,
    holdout: float = DEFAULT_HOLDOUT,
    device: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> FitResult:
    """Build the bank from train/good minus a held-out share; validate on held-out + defects."""
    category = _single_category(records)
    good = [r for r in records if r.split == "train" and r.label == 0]
    if not good:
        raise FitError(f"category {category!r} has no train/good images to learn from")
    bank_records, held_out = split_holdout(good, holdout, config.seed)
    if config.scorer != "patch" and not held_out:
        raise FitError(
            f"scorer {config.scorer!r} is calibrated on held-out normal images; "
            "fit with --holdout above 0 (e.g. 0.2) or use --scorer patch"
        )
    torch_device = resolve_device(device)
    extractor = build_extractor(config, torch_device)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    selection = _bank_selection(config, torch_device.type)
    statistics, pixel_statistics, skipped = _bank_features(
        extractor, config, bank_records, batch_size, progress, selection
    )
    timings["features_s"] = time.perf_counter() - start - selection.seconds
    start = time.perf_counter() - selection.seconds  # chunks selected while streaming count too
    bank = _memory_bank(selection, config, torch_device.type)
    timings["coreset_s"] = time.perf_counter() - start
    if bank.index_type == "ivfpq":  # named: "auto" in a saved model keeps its older meaning
        config = dataclasses.replace(config, index="ivfpq")
    global_scorer = pixel_scorer = None
    if len(statistics) >= 2:
        global_scorer = GlobalScorer.fit(statistics)
        pixel_scorer = GlobalScorer.fit(pixel_statistics)
    elif config.scorer != "patch":
        raise FitError(f"scorer {config.scorer!r} needs at least 2 readable bank images")

    # Raw parts first: the fused score can only be normalised once held-out parts are known.
    probe_config = dataclasses.replace(config, scorer="patch")
    probe = PatchCore(
        probe_config, extractor, bank, np.empty(0, np.float32), global_scorer, None, pixel_scorer
    )
    normals = held_out + [r for r in records if r.split == "test" and r.label == 0]
    anomalous = [r for r in records if r.label == 1]
    # An approximate bank is audited on the same pass: each batch's patches are also searched
    # exactly, so the backbone runs once per validation image.
    audited = len(normals) + len(anomalous)
    scorer = SearchAudit(probe, audit_stride(bank.size, audited)) if _approximate(bank) else probe
    start = time.perf_counter()
    normal_parts, bad = score_records(scorer, normals, batch_size, progress, "held-out normal")
    skipped |= bad
    anomalous_parts, bad = score_records(scorer, anomalous, batch_size, progress, "defects")
    skipped |= bad
    timings["validation_s"] = time.perf_counter() - start

    n_calibration = _count_ok(held_out, skipped)
    model = calibrated(probe, config.scorer, normal_parts[:n_calibration])
    normal_scores = np.r_[model.calibration, combine_parts(model, normal_parts[n_calibration:])]
    anomalous_scores = combine_parts(model, anomalous_parts)
    validation = validation_metrics(normal_scores, anomalous_scores, model.calibration)
    validation["bank_size"] = bank.size
    if isinstance(scorer, SearchAudit):
        validation["search"] = scorer.cost(normal_parts[:, 0], anomalous_parts[:, 0])
        timings["search_cost_s"] = scorer.seconds
    validation["bank_images"] = len(bank_records) - sum(r.path in skipped for r in bank_records)
    return FitResult(
        category=category,
        model=model,
        validation=validation,
        bank_paths=frozenset(r.path for r in bank_records),
        validation_paths=frozenset(r.path for r in normals + anomalous),
        skipped=skipped,
        timings=timings,
        scores={"normal": normal_scores, "anomalous": anomalous_scores},
        parts={"normal": normal_parts, "anomalous": anomalous_parts},
        row_paths={
            "normal": tuple(r.path for r in normals if r.path not in skipped),
            "anomalous": tuple(r.path for r in anomalous if r.path not in skipped),
        },
        defect_kinds=tuple(r.defect_type or "bad" for r in anomalous if r.path not in skipped),
    )


def _single_category(records: Sequence[ImageRecord]) -> str:
    categories = {r.category for r in records}
    if len(categories) != 1:
        raise FitError(f"fit one category at a time, got {sorted(categories) or 'none'}")
    return categories.pop()


def _count_ok(records: Sequence[ImageRecord], skipped: dict[Path, str]) -> int:
    return sum(r.path not in skipped for r in records)


def _bank_features(
    extractor: Any,
    config: PatchCoreConfig,
    records: Sequence[ImageRecord],
    batch_size: int,
    progress: bool,
    selection: ChunkedSelection,
) -> tuple[np.ndarray, np.ndarray, dict[Path, str]]:
    """Stream every bank image's patch features as the bank searches them (search_vectors),
    with the grid cell of each, into ``selection``; return each image's pooled statistics of
    the raw features (N_images, 2D) and pixel statistics (N_images, 4) for the whole-image
    parts, and the unreadable images skipped. The bar's rate includes the chunks selected on
    the way, so its ETA is fit's until the bank is built (smoothing 0: the average rate, which
    those pauses do not swing)."""
    statistics: list[np.ndarray] = []
    pixels: list[np.ndarray] = []
    skipped: dict[Path, str] = {}
    paths = [r.path for r in records]
    bar = tqdm(total=len(paths), desc="features", unit="img", disable=not progress, smoothing=0)
    for chunk, decoded in iter_batches(paths, config.preprocessing(), batch_size):
        skipped |= {chunk[i]: reason for i, reason in decoded.failures.items()}
        if decoded.ok:
            patches = extract_patches(extractor, config, decoded.tensor)
            vectors = search_vectors(config, patches.reshape(-1, patches.shape[-1]))
            selection.add(vectors, grid_positions(*patches.shape[:3]))
            statistics.append(pooled_statistics(patches))
            pixels.append(image_statistics(decoded.tensor))
        bar.update(len(chunk))
    bar.close()
    if not statistics:
        raise FitError("none of the training images could be read; see the reasons above")
    return np.concatenate(statistics), np.concatenate(pixels), skipped


def _bank_selection(config: PatchCoreConfig, device: str) -> ChunkedSelection:
    """How bank patches are kept as they stream in: the greedy coreset (or all of them, at
    ratio 1) per chunk of CHUNK_ROWS patches, so fits of up to CHUNK_ROWS patches select from
    one chunk exactly as before; the seed recipe's random cap (``max_bank``) draws from all
    patches at once, so it holds them all."""
    select = _every_row
    if config.coreset_ratio < 1:
        sampler = ApproximateGreedyCoresetSampler(
            config.coreset_ratio, seed=config.seed, device=device
        )
        select = sampler.sample
    if config.max_bank is None:
        return ChunkedSelection(select, CHUNK_ROWS)
    cap = RandomSubsampler(config.max_bank, seed=config.seed)
    return ChunkedSelection(
        lambda rows: cap.sample(rows) if len(rows) > cap.max_size else select(rows), None
    )


def _every_row(features: np.ndarray) -> np.ndarray:
    return np.arange(len(features))


def _memory_bank(selection: ChunkedSelection, config: PatchCoreConfig, device: str) -> MemoryBank:
    """The memory bank M of the selected patch features (and their grid cells)."""
    features, positions = selection.result()
    # Positions are kept whatever the config: any radius can then be tried on this bank without
    # refitting (the artifact stores them only for a position-aware config).
    return MemoryBank(features, index=config.index, device=device, positions=positions)


def score_records(
    model: PatchCore | SearchAudit,
    records: Sequence[ImageRecord],
    batch_size: int,
    progress: bool,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (n, model.n_parts) [s*, global(, pixel)] scores of the readable records, in order
    (global is 0 when the model has no global part); unreadable ones are returned apart."""
    parts: list[np.ndarray] = []
    skipped: dict[Path, str] = {}
    paths = [r.path for r in records]
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress or not paths)
    for chunk, decoded in iter_batches(paths, model.preprocessing, batch_size):
        skipped |= {chunk[i]: reason for i, reason in decoded.failures.items()}
        if decoded.ok:
            parts.append(raw_parts(model.score_tensors(decoded.tensor)))
        bar.update(len(chunk))
    bar.close()
    empty = np.empty((0, model.n_parts), np.float32)
    return (np.concatenate(parts) if parts else empty), skipped


def _approximate(bank: MemoryBank) -> bool:
    """Whether the bank's search may miss the nearest patch (an exact torch search stands in
    for every index on a GPU without faiss-gpu)."""
    return bank.index_type in ("ivf", "ivfpq", "hnsw") and bank.backend == "faiss"


# Exact work the audit may do: validation images x bank patches. An exact search costs ~9 CPU s
# per image against 1M patches (2-core VM, 1 thread), so a big fit audits a sample: 4e6 is
# ~40 CPU s of exact search whatever the bank, e.g. every image up to 30k patches and 160 of
# them, but 16 at 250k patches.
AUDIT_IMAGE_PATCHES = 4_000_000
AUDIT_MIN_IMAGES = 16


def audit_stride(bank_size: int, images: int) -> int:
    """Audit every n-th validation image, so that the exact side stays within the budget
    (AUDIT_IMAGE_PATCHES) but still sees at least AUDIT_MIN_IMAGES images."""
    affordable = max(AUDIT_MIN_IMAGES, AUDIT_IMAGE_PATCHES // max(1, bank_size))
    return max(1, math.ceil(images / affordable))


def with_exact_search(model: PatchCore) -> PatchCore:
    """The same model searching its bank exactly: what an approximate search is judged against.
    The torch search shares the bank's vectors on CPU (FAISS flat would copy them) and took 2.4x
    less CPU than FAISS flat for 6k queries against 50k patches (1 thread)."""
    bank = model.bank
    return model.with_bank(MemoryBank(bank.vectors, "torch", bank.device, positions=bank.positions))


class SearchAudit:
    """Scores like the probe, whose bank searches approximately, and also searches the same
    patch features in an exact bank, keeping what the exact search gives: the approximate
    search's accuracy cost measured on the validation pass itself, with no second decode and
    backbone pass. The exact side runs the whole bank-dependent part of the score (pooling,
    eq. 7 reweighting, position-aware search), so its s* is the one an exact model gives.
    It searches every `stride`-th image (counted over all calls), so that a large bank's
    exact search does not outgrow the fit (`audit_stride`)."""

    def __init__(self, probe: PatchCore, stride: int = 1) -> None:
        self._probe = probe
        self._stride = stride
        self._seen = 0
        self._audited: list[np.ndarray] = []  # per call: which images the exact side searched
        self._exact = with_exact_search(probe)
        self.preprocessing = probe.preprocessing
        self.n_parts = probe.n_parts
        self._hits = self._patches = 0
        self.seconds = 0.0  # spent on the exact side
        self._exact_scores: list[np.ndarray] = []

    def score_tensors(self, images: torch.Tensor) -> ScoreBatch:
        """The probe's scores of a batch; the exact search's kept aside."""
        patches = extract_patches(self._probe.extractor, self._probe.config, images)
        found = self._probe.score_patches(patches, images)
        chosen = (self._seen + np.arange(len(patches))) % self._stride == 0
        self._seen += len(patches)
        self._audited.append(chosen)
        if chosen.any():
            start = time.perf_counter()
            exact_maps, exact_scores = self._exact.patch_distances(patches[chosen])
            self.seconds += time.perf_counter() - start
            self._hits += int(np.isclose(found.patch_maps[chosen], exact_maps, rtol=1e-5).sum())
            self._patches += exact_maps.size
            self._exact_scores.append(exact_scores)
        return found

    def cost(self, found_normal: np.ndarray, found_anomalous: np.ndarray) -> dict[str, Any]:
        """What fit stores as validation "search": the probe's raw patch scores s* of the normal
        and then the anomalous images it scored (in that order) against the exact search's.
        recall_at_1 is the share of patches whose nearest distance both searches agree on."""
        audited = np.concatenate(self._audited or [np.empty(0, bool)])
        labels = np.r_[np.zeros(len(found_normal)), np.ones(len(found_anomalous))][audited]
        found = np.r_[found_normal, found_anomalous][audited]
        truth = np.concatenate(self._exact_scores or [np.empty(0, np.float32)])
        change = np.abs(found - truth) / np.maximum(truth, np.finfo(np.float32).tiny)
        auroc_change = None
        if 0 < labels.sum() < len(labels):
            auroc_change = float(roc_auc_score(labels, found) - roc_auc_score(labels, truth))
        return {
            "index": self._probe.bank.index_type,
            "audited_images": int(audited.sum()),
            "recall_at_1": self._hits / self._patches if self._patches else None,
            "max_image_score_change": float(change.max()) if len(change) else None,
            "auroc_change": auroc_change,
        }


def raw_parts(result: ScoreBatch) -> np.ndarray:
    """A scored batch's raw (B, parts) [s*, global(, pixel)] scores (global 0 when the model
    has no global part)."""
    global_scores = result.global_scores
    if global_scores is None:
        global_scores = np.zeros_like(result.image_scores)
    columns = [result.patch_scores, global_scores]
    if result.pixel_scores is not None:
        columns.append(result.pixel_scores)
    return np.stack(columns, axis=1)


def validation_metrics(
    normal_scores: np.ndarray, anomalous_scores: np.ndarray, calibration: np.ndarray
) -> dict[str, Any]:
    """AUROC / AP on held-out images, and the held-out normal score quantiles."""
    result: dict[str, Any] = {
        "n_normal": len(normal_scores),
        "n_anomalous": len(anomalous_scores),
        "auroc": None,
        "average_precision": None,
    }
    if len(normal_scores) and len(anomalous_scores):
        labels = np.r_[np.zeros(len(normal_scores)), np.ones(len(anomalous_scores))]
        scores = np.r_[normal_scores, anomalous_scores]
        result["auroc"] = float(roc_auc_score(labels, scores))
        result["average_precision"] = float(average_precision_score(labels, scores))
    if len(calibration):
        for q in (0.5, 0.95, 0.99):
            result[f"normal_q{round(q * 100)}"] = float(np.quantile(calibration, q))
    return result
