"""Teaching a fitted model its false alarms: add reviewed-normal patches to the memory bank.

No refit: the backbone, the bank and the whole-image parts stay; only the patches of the new
normal images that the bank does not already cover are appended.

Coverage radius r: the median, over the normal images fit held out of the bank, of their
largest patch distance to the bank (s*, stored in the artifact as the held-out calibration).
Half of the normal images the model has never seen have *every* patch within r of the bank, so
a new patch farther than r is an appearance the bank does not know yet. Patches are added by
continuing the greedy k-center coreset: take the uncovered patch farthest from the bank plus
what was already added, add it, repeat until every new patch is within r. So the bank grows by
the number of r-balls needed to cover the new appearance, not by the number of new patches,
and every patch of the update images ends up within r: their s* falls to at most r, below a
typical held-out normal's.

The whole-image parts of a fused model (global feature and pixel statistics, Gaussians of the
bank images) are left as they are. Merging the update images into those Gaussians was tried: on
tests/synthetic.py's review layout it took the held-out false alarms' median score from 13.6 to
1.8, but widened the Gaussians so much that held-out defects fell from 49 to 27 (a Gaussian
cannot hold "normal, or this new variant" without also accepting what lies between). So the
update teaches what the bank can hold exactly, patches; a false alarm that is unusual as a
whole image (a lighting change) keeps that part of its score, and `patchq fit` on the new
images is the way to teach it.

The held-out calibration is kept: a larger bank can only shorten patch distances, so the
stored held-out scores stay an upper bound and thresholds derived from them stay conservative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.batches import iter_batches
from common.engine.memory_bank import MemoryBank
from common.engine.model_file import held_out_patch_maxima
from common.engine.patchcore import PatchCore, extract_patches
from common.errors import PatchqError


class BankUpdateError(PatchqError):
    """A model cannot be updated as asked."""


@dataclass(frozen=True)
class BankUpdate:
    """The updated model and what changed."""

    model: PatchCore
    radius: float
    candidates: int  # patches of the update images
    added: int  # of them, appended to the bank
    bank_before: int
    bank_after: int


def coverage_radius(model: PatchCore) -> float:
    """r: the median held-out normal image's largest patch distance (see the module notes)."""
    held_out = held_out_patch_maxima(model.part_calibration, model.calibration, model.config.scorer)
    if not len(held_out):
        raise BankUpdateError(
            "the model has no held-out normal scores to define its coverage radius; "
            "refit it with --holdout above 0 (e.g. 0.2)"
        )
    return float(np.median(held_out))


def patch_features(
    model: PatchCore, paths: Sequence[Path], batch_size: int
) -> tuple[np.ndarray, dict[Path, str]]:
    """All patch features (N, D) of the readable images, and the unreadable ones' reasons."""
    chunks: list[np.ndarray] = []
    skipped: dict[Path, str] = {}
    for chunk, decoded in iter_batches(paths, model.preprocessing, batch_size):
        skipped |= {chunk[i]: reason for i, reason in decoded.failures.items()}
        if decoded.ok:
            patches = extract_patches(model.extractor, model.config, decoded.tensor)
            chunks.append(patches.reshape(-1, patches.shape[-1]))
    if not chunks:
        raise BankUpdateError("none of the reviewed-normal images could be read")
    return np.concatenate(chunks), skipped


def image_scores(model: PatchCore, paths: Sequence[Path], batch_size: int) -> dict[Path, float]:
    """Each readable image's score under `model` (unreadable images are absent)."""
    scores: dict[Path, float] = {}
    for chunk, decoded in iter_batches(paths, model.preprocessing, batch_size):
        readable = [chunk[i] for i in decoded.ok]
        if decoded.ok:
            batch = model.score_tensors(decoded.tensor).image_scores
            scores |= dict(zip(readable, map(float, batch), strict=True))
    return scores


def uncovered(bank: MemoryBank, candidates: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the candidates to add so every candidate is within `radius` of the bank
    (greedy k-center, farthest first)."""
    if not len(candidates):
        return np.empty(0, np.int64)
    distances = bank.search(candidates, k=1)[0][:, 0].astype(np.float64)
    chosen: list[int] = []
    while True:
        farthest = int(np.argmax(distances))
        if distances[farthest] <= radius:
            return np.array(chosen, np.int64)
        chosen.append(farthest)
        gap = np.linalg.norm(candidates - candidates[farthest], axis=1)
        distances = np.minimum(distances, gap)


def update_bank(model: PatchCore, features: np.ndarray, device: str) -> BankUpdate:
    """The model with the uncovered patches of `features` appended to its bank."""
    radius = coverage_radius(model)
    added = features[uncovered(model.bank, features, radius)]
    vectors = np.concatenate([model.bank.vectors, added]) if len(added) else model.bank.vectors
    bank = MemoryBank(vectors, index=model.config.index, device=device)
    return BankUpdate(
        model=model.with_bank(bank),
        radius=radius,
        candidates=len(features),
        added=len(added),
        bank_before=model.bank.size,
        bank_after=bank.size,
    )
