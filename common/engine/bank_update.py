"""Teaching a fitted model its false alarms: reviewed-normal patches join the memory bank,
reviewed-normal images join the whole-image parts as exemplars.

No refit: the backbone, the bank and the whole-image Gaussians stay; only the patches of the new
normal images that the bank does not already cover are appended, and only the images a
whole-image part does not already cover are kept as its exemplars.

Coverage radius r: the median, over the normal images fit held out of the bank, of their
largest patch distance to the bank (s*, stored in the artifact as the held-out calibration).
Half of the normal images the model has never seen have *every* patch within r of the bank, so
a new patch farther than r is an appearance the bank does not know yet. Patches are added by
continuing the greedy k-center coreset: take the uncovered patch farthest from the bank plus
what was already added, add it, repeat until every new patch is within r. So the bank grows by
the number of r-balls needed to cover the new appearance, not by the number of new patches,
and every patch of the update images ends up within r: their s* falls to at most r, below a
typical held-out normal's. The patches are compared as the model compares them: unit vectors
for a cosine model, and for a position-aware one only with patches from cells within its
radius (a new patch covers a later one only where it could be its neighbour), the added
patches keeping their grid cells.

The whole-image parts of a fused model (global feature and pixel statistics, Gaussians of the
bank images) are taught by exemplars, the same way (common/engine/global_scorer.py): an update
image whose part distance is beyond that part's radius r (the median held-out normal's
distance) is kept as a point beside the Gaussian, greedily, farthest first, until every update
image scores at most r on every part. Merging the update images into the Gaussians was tried
first: on synthetic/layouts.py's review layout it took the held-out false alarms' median score
from 13.6 to 1.8, but widened the Gaussians so much that held-out defects fell from 49 to 27
(a Gaussian cannot hold "normal, or this new variant" without also accepting what lies
between). An exemplar only lowers images within its reach (sqrt(2) r), so defects elsewhere
keep their whole-image scores exactly. On elpv mono (docs/review.md, default fused scorer) the
14 taught false alarms stayed 11 above the old threshold with the bank alone and 0 with the
exemplars too; answer-keyed test defects kept their median score (11.1) and all 71 of 87
flags, held-out AUROC 0.954 -> 0.955.

The held-out calibration is kept: a larger bank can only shorten patch distances and an
exemplar can only lower a part's distance, so every part of a held-out normal scores at most
what is stored; the stored scores stay an upper bound, and thresholds and tail probabilities
derived from them stay conservative (a new score is compared against normals that scored
at least as high under the new model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.batches import iter_batches
from common.engine.global_scorer import GlobalScorer, image_statistics, pooled_statistics
from common.engine.memory_bank import MemoryBank, saved_index
from common.engine.model_file import held_out_patch_maxima
from common.engine.patchcore import PatchCore, extract_patches, search_vectors
from common.engine.position_search import grid_positions
from common.errors import PatchqError


class BankUpdateError(PatchqError):
    """A model cannot be updated as asked."""


@dataclass(frozen=True)
class UpdateFeatures:
    """What the update images offer each part of the model."""

    patches: np.ndarray  # (N, D) all patch features, as the bank searches them
    positions: np.ndarray  # (N, 2) the grid cell of each
    pooled: np.ndarray  # (images, 2D) pooled feature statistics, for the global part
    pixel: np.ndarray  # (images, 4) pixel statistics, for the pixel part
    skipped: dict[Path, str]  # unreadable images and why


@dataclass(frozen=True)
class BankUpdate:
    """The updated model and what changed."""

    model: PatchCore
    radius: float
    candidates: int  # patches of the update images
    added: int  # of them, appended to the bank
    bank_before: int
    bank_after: int
    global_exemplars: int  # update images kept as exemplars of the global part
    pixel_exemplars: int  # ... of the pixel part

    @property
    def changed(self) -> bool:
        return bool(self.added or self.global_exemplars or self.pixel_exemplars)


def coverage_radius(model: PatchCore) -> float:
    """r: the median held-out normal image's largest patch distance (see the module notes).

    With ``top_share`` the held-out scores are means of their largest patch distances, below
    the largest, so r is smaller and the update adds more patches: still every update patch
    ends within r of the bank."""
    held_out = held_out_patch_maxima(model.part_calibration, model.calibration, model.config.scorer)
    if not len(held_out):
        raise BankUpdateError(
            "the model has no held-out normal scores to define its coverage radius; "
            "refit it with --holdout above 0 (e.g. 0.2)"
        )
    return float(np.median(held_out))


def update_features(model: PatchCore, paths: Sequence[Path], batch_size: int) -> UpdateFeatures:
    """Patch features and per-image statistics of the readable images."""
    patches: list[np.ndarray] = []
    cells: list[np.ndarray] = []
    pooled: list[np.ndarray] = []
    pixel: list[np.ndarray] = []
    skipped: dict[Path, str] = {}
    for chunk, decoded in iter_batches(paths, model.preprocessing, batch_size):
        skipped |= {chunk[i]: reason for i, reason in decoded.failures.items()}
        if decoded.ok:
            batch = extract_patches(model.extractor, model.config, decoded.tensor)
            patches.append(search_vectors(model.config, batch.reshape(-1, batch.shape[-1])))
            cells.append(grid_positions(*batch.shape[:3]))
            pooled.append(pooled_statistics(batch))
            pixel.append(image_statistics(decoded.tensor))
    if not patches:
        raise BankUpdateError("none of the reviewed-normal images could be read")
    return UpdateFeatures(
        np.concatenate(patches),
        np.concatenate(cells),
        np.concatenate(pooled),
        np.concatenate(pixel),
        skipped,
    )


def image_scores(model: PatchCore, paths: Sequence[Path], batch_size: int) -> dict[Path, float]:
    """Each readable image's score under `model` (unreadable images are absent)."""
    scores: dict[Path, float] = {}
    for chunk, decoded in iter_batches(paths, model.preprocessing, batch_size):
        readable = [chunk[i] for i in decoded.ok]
        if decoded.ok:
            batch = model.score_tensors(decoded.tensor).image_scores
            scores |= dict(zip(readable, map(float, batch), strict=True))
    return scores


def uncovered(model: PatchCore, features: UpdateFeatures, radius: float) -> np.ndarray:
    """Indices of the update patches to add so every one is within `radius` of the bank as
    the model searches it (greedy k-center, farthest first)."""
    candidates, cells = features.patches, features.positions
    if not len(candidates):
        return np.empty(0, np.int64)
    distances = model.nearest(candidates, cells)[0][:, 0].astype(np.float64)
    reach = model.config.position_radius
    chosen: list[int] = []
    while True:
        farthest = int(np.argmax(distances))
        if distances[farthest] <= radius:
            return np.array(chosen, np.int64)
        chosen.append(farthest)
        gap = np.linalg.norm(candidates - candidates[farthest], axis=1)
        if reach is not None:  # a patch only serves the cells within the radius of its own
            gap[np.abs(cells - cells[farthest]).max(axis=1) > reach] = np.inf
        distances = np.minimum(distances, gap)


def update_model(model: PatchCore, features: UpdateFeatures, device: str) -> BankUpdate:
    """The model with the uncovered patches appended to its bank and the uncovered images kept
    as exemplars of its whole-image parts."""
    radius = coverage_radius(model)
    added = uncovered(model, features, radius)
    vectors = np.concatenate([model.bank.vectors, features.patches[added]])
    positions = model.bank.positions
    if positions is not None:
        positions = np.concatenate([positions, features.positions[added]])
    index = saved_index(model.config.index, len(model.bank.vectors))
    bank = MemoryBank(vectors, index=index, device=device, positions=positions)
    global_scorer, pixel_scorer = model.global_scorer, model.pixel_scorer
    if model.config.scorer in ("global", "fused"):  # only the parts the image score uses
        global_scorer = _taught(global_scorer, features.pooled, model.part_calibration, 1)
    if model.config.scorer == "fused":
        pixel_scorer = _taught(pixel_scorer, features.pixel, model.part_calibration, 2)
    taught = PatchCore(
        model.config,
        model.extractor,
        bank,
        model.calibration,
        global_scorer,
        model.part_calibration,
        pixel_scorer,
    )
    return BankUpdate(
        model=taught,
        radius=radius,
        candidates=len(features.patches),
        added=len(added),
        bank_before=model.bank.size,
        bank_after=bank.size,
        global_exemplars=_new_exemplars(model.global_scorer, global_scorer),
        pixel_exemplars=_new_exemplars(model.pixel_scorer, pixel_scorer),
    )


def _taught(
    scorer: GlobalScorer | None, statistics: np.ndarray, parts: np.ndarray, column: int
) -> GlobalScorer | None:
    """A whole-image part taught the images, its radius the held-out normals' median."""
    if scorer is None or not len(parts):
        return scorer
    return scorer.with_exemplars(statistics, float(np.median(parts[:, column])))


def _new_exemplars(before: GlobalScorer | None, after: GlobalScorer | None) -> int:
    return (after.n_exemplars if after else 0) - (before.n_exemplars if before else 0)
