"""`patchq fit --auto` without labelled defects: choose the model on the normals alone.

Most categories start with good images only. No single configuration suits them all: cosine
neighbours (normalised patch features) found the real defects of aligned solar cells best
(elpv poly 0.889 vs L2's 0.865 in this module's probe, docs/accuracy.md) and hurt a fine
texture's small defects, where the stride-4 candidate (`fine`) found what the default missed
(speckle 0.98 vs 0.58). Two label-free signals decide, each where it was measured to be right:

1. **Alignment**, from the good images' patch features alone: the share of their variance
   that the grid position explains (``positional_share``). Parts photographed in place (solar
   cells with their busbars and edges) have features that depend on where they are; a texture
   looks alike everywhere. An aligned category gets cosine neighbours scored by s*
   (``aligned_candidate``). Synthesised defects are no guide there: on polycrystalline cells
   every synthesised kind favoured `fine` and L2, while the real defects favoured cosine
   (issue 23's probes and this module's).
2. **Synthesised defects** (common/engine/defect_synthesis.py) pasted onto copies of the
   held-out normals: on a texture, small spots and thin scratches ranked the candidates as the
   real small defects did, so a texture gets `fine` where its leave-one-out AUROC on the
   synthesised local kinds beats the base's by ``MARGIN``, else the base (a close call keeps
   the default). Both keep the base's scorer (fused: whole-image defects).

The alignment is measured before anything is fitted, so an aligned category fits one model
and a texture two: the cost of the choice is one more fit at most, and the scoring of
the synthesised images (``PER_LOCAL_KIND``, ``PER_WHOLE_IMAGE_KIND``) per candidate. A texture
with more than ``CHOICE_IMAGES`` good images is compared on fits of a seeded sample of that
many, and only the chosen candidate is then fitted on all of them: the choice ranks two
candidates, which a few hundred images do as well as thousands, and a second full fit would
double the fit of a large category (at 3,000 good images the `fine` fit alone takes minutes).

Nothing synthesised enters a bank or a calibration. The model records what chose it (the
alignment share, the synthesised kinds and every candidate's figures on them) as figures on
synthesised defects, never as validation: a category without labelled defects has no
validation AUROC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from common.data.images import ImageLoadError, Preprocessing, load_rgb
from common.data.layouts import ImageRecord
from common.engine.auto import AutoFit, Rows, cosine, fine, selection_figures
from common.engine.defect_synthesis import (
    FAMILY,
    GLOBAL_KINDS,
    KINDS,
    LOCAL_KINDS,
    synthesise_set,
)
from common.engine.features import PatchFeatureExtractor
from common.engine.fit import FitError, FitResult, fit_category, raw_parts, split_holdout
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore, build_extractor, extract_patches, resolve_device

# Held-out normals below which the choice is not made (20% of 40 good images): fewer leave
# too few backgrounds for the synthesised copies to be ranked against.
MIN_NORMALS = 8
# Share of the patch features' variance explained by the grid position above which a category
# counts as aligned. Measured on the default features' central region (docs/accuracy.md): elpv
# mono 0.59 and poly 0.28 (150 good cells each); the synthetic stripes 0.10 and grain 0.12.
# Set halfway between the textures and the less aligned cells.
ALIGNED_SHARE = 0.2
# How much better `fine` must rank the synthesised local defects than the base to be chosen.
MARGIN = 0.02
# Synthesised images per kind. The local kinds decide between the candidates, the whole-image
# kinds are only reported; 6 x 4 + 3 x 4 = 36 images per candidate keep scoring them below the
# cost of one fit of a few hundred images, whatever the holdout.
PER_LOCAL_KIND = 6
PER_WHOLE_IMAGE_KIND = 3
# Good images whose features measure the alignment: the share is corrected for the noise of
# few images, and 16 already set the textures (0.08-0.12) well apart from the cells.
ALIGNMENT_IMAGES = 16
# Good images a texture's candidates are compared on (a seeded sample above it). 400 images keep
# 80 held-out normals for the synthesised copies (10x MIN_NORMALS) and two candidate fits near
# a minute on 2 cores.
CHOICE_IMAGES = 400


def aligned_candidate(config: PatchCoreConfig) -> PatchCoreConfig:
    """Cosine neighbours (normalised patch features) scored by s*, the largest patch distance.

    Measured on elpv (150 good cells, its labelled test cells; docs/accuracy.md): poly s* 0.889
    with cosine against 0.873 with L2, and 0.859 for the default's fused score; the fused
    score's whole-image parts (pixel statistics 0.70 on poly) dilute what the patches find on
    cells whose brightness varies from cell to cell, with or without cosine.
    """
    return dataclasses.replace(cosine(config), scorer="patch")


def can_choose_label_free(records: Sequence[ImageRecord], holdout: float, seed: int) -> bool:
    """Whether there are enough held-out normals (``MIN_NORMALS``) to choose without labels."""
    good = [r for r in records if r.split == "train" and r.label == 0]
    return len(split_holdout(good, holdout, seed)[1]) >= MIN_NORMALS


def fit_label_free(
    records: Sequence[ImageRecord],
    base: PatchCoreConfig,
    holdout: float,
    device: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
    choice_images: int = CHOICE_IMAGES,
) -> AutoFit:
    """Measure the category's alignment, fit its candidates and choose as the module says;
    a texture's candidates on at most ``choice_images`` good images, the chosen one on all."""
    good = [r for r in records if r.split == "train" and r.label == 0]
    extractor = build_extractor(base, resolve_device(device))
    share = positional_share(extractor, base, _images(good[:ALIGNMENT_IMAGES]), batch_size)
    aligned = share >= ALIGNED_SHARE
    candidates = (
        {"cosine": aligned_candidate(base)} if aligned else {"default": base, "fine": fine(base)}
    )
    deciding = records if aligned else choice_sample(records, choice_images, base.seed)
    held_out = _held_out_images(deciding, holdout, base.seed)
    fits = {
        name: fit_category(deciding, config, holdout, device, batch_size, progress)
        for name, config in candidates.items()
    }
    local = synthesise_set(held_out, LOCAL_KINDS, PER_LOCAL_KIND, base.seed + 1)
    whole = synthesise_set(held_out, GLOBAL_KINDS, PER_WHOLE_IMAGE_KIND, base.seed + 2)
    synthetic, kinds = local[0] + whole[0], local[1] + whole[1]
    figures = {
        name: synthesised_figures(fit, fit.model.config.scorer, synthetic, kinds, batch_size)
        for name, fit in fits.items()
    }
    chosen = "cosine" if aligned else _texture_choice(figures)
    compared = fits[chosen]
    fit = (
        compared
        if deciding is records
        else fit_category(records, candidates[chosen], holdout, device, batch_size, progress)
    )
    record = {
        "chosen": f"{chosen} {fit.model.config.scorer}",
        "chosen_on": "synthesised",
        "positional_share": share,
        "aligned": aligned,
        "synthesised_kinds": {kind: FAMILY[kind] for kind in KINDS},
        "n_synthesised": len(synthetic),
        "synthesised_auroc": figures,
        "compared_on_good_images": sum(r.split == "train" and r.label == 0 for r in deciding),
        "selection_paths": sorted(str(p.absolute()) for p in compared.row_paths["normal"]),
    }
    return AutoFit(record["chosen"], fit, fit.model, fit.validation | {"auto": record})


def choice_sample(
    records: Sequence[ImageRecord], choice_images: int, seed: int
) -> Sequence[ImageRecord]:
    """``records`` with their good train images cut to a seeded sample of ``choice_images``
    (in their order), or ``records`` itself where there are no more than that."""
    good = [i for i, r in enumerate(records) if r.split == "train" and r.label == 0]
    if len(good) <= choice_images:
        return records
    dropped = set(np.random.default_rng(seed).permutation(good)[choice_images:].tolist())
    return [r for i, r in enumerate(records) if i not in dropped]


def _held_out_images(records: Sequence[ImageRecord], holdout: float, seed: int) -> list[np.ndarray]:
    """The held-out normals a fit of ``records`` keeps out of its bank, as images: what the
    synthesised defects are pasted on, so no candidate's bank has seen their backgrounds."""
    good = [r for r in records if r.split == "train" and r.label == 0]
    held_out = _images(split_holdout(good, holdout, seed)[1])
    if len(held_out) < 2:
        raise FitError(
            f"--auto without labelled defects needs at least 2 readable held-out normals, got "
            f"{len(held_out)}; add good images, raise --holdout, or fit with --no-auto"
        )
    return held_out


def _texture_choice(figures: dict[str, dict[str, float]]) -> str:
    """`fine` where it ranks the synthesised local defects better than the base by MARGIN."""
    gain = figures["fine"]["local"] - figures["default"]["local"]
    return "fine" if gain >= MARGIN else "default"


def positional_share(
    extractor: PatchFeatureExtractor,
    config: PatchCoreConfig,
    images: Sequence[np.ndarray],
    batch_size: int,
) -> float:
    """The share of the patch features' variance that the grid position explains, over the
    central two thirds of the grid (the outer cells' features are shaped by the backbone's
    zero padding in every category), corrected for the noise of a per-position mean over few
    images: (between-position variance - within / (n - 1)) / total variance."""
    features = _features(extractor, config, images, batch_size)
    n, h, w, _ = features.shape
    if n < 2:
        return 0.0
    mh, mw = max(1, h // 6), max(1, w // 6)
    central = features[:, mh : h - mh, mw : w - mw].astype(np.float64)
    per_position = central.mean(axis=0)
    overall = per_position.mean(axis=(0, 1))
    total = float(((central - overall) ** 2).sum(axis=-1).mean())
    between = float(((per_position - overall) ** 2).sum(axis=-1).mean())
    within = float(((central - per_position) ** 2).sum(axis=-1).mean())
    return max(0.0, between - within / (n - 1)) / max(total, 1e-12)


def synthesised_figures(
    fit: FitResult,
    scorer: str,
    synthetic: Sequence[np.ndarray],
    kinds: Sequence[str],
    batch_size: int,
) -> dict[str, float]:
    """Leave-one-out AUROC of the fit's model (with ``scorer``) on the synthesised images
    against its held-out normals: per kind, and the mean per family ("local", "whole-image")."""
    parts = score_images(fit.model, synthetic, batch_size)
    with_synthetic = dataclasses.replace(
        fit, parts=fit.parts | {"anomalous": parts}, defect_kinds=tuple(kinds)
    )
    normal_rows = np.arange(len(fit.parts["normal"]))
    kind_array = np.asarray(kinds)
    by_kind = {
        kind: selection_figures(
            with_synthetic, scorer, Rows(normal_rows, np.flatnonzero(kind_array == kind))
        )[0]
        for kind in dict.fromkeys(kinds)
    }
    families: dict[str, list[float]] = {}
    for kind, auroc in by_kind.items():
        families.setdefault(FAMILY[kind], []).append(auroc)
    return by_kind | {family: float(np.mean(values)) for family, values in families.items()}


def score_images(model: PatchCore, images: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
    """Raw (n, model.n_parts) [s*, global(, pixel)] scores of in-memory uint8 RGB images."""
    rows = []
    for start in range(0, len(images), batch_size):
        batch = _tensor(model.preprocessing, images[start : start + batch_size])
        result = model.score_tensors(batch)
        rows.append(raw_parts(result))
    return np.concatenate(rows)


def _features(
    extractor: PatchFeatureExtractor,
    config: PatchCoreConfig,
    images: Sequence[np.ndarray],
    batch_size: int,
) -> np.ndarray:
    preprocessing = config.preprocessing()
    chunks = []
    for start in range(0, len(images), batch_size):
        tensor = _tensor(preprocessing, images[start : start + batch_size])
        chunks.append(extract_patches(extractor, config, tensor))
    return np.concatenate(chunks)


def _tensor(preprocessing: Preprocessing, images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.stack([preprocessing.to_tensor(Image.fromarray(i)) for i in images])


def _images(records: Sequence[ImageRecord]) -> list[np.ndarray]:
    """The readable images among ``records`` as uint8 RGB arrays (the fit already reported
    the unreadable ones)."""
    images = []
    for record in records:
        try:
            images.append(np.asarray(load_rgb(record.path)))
        except ImageLoadError:
            continue
    return images
