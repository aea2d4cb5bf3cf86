"""`patchq fit --auto`: choose a model by held-out validation, report the choice cross-fitted.

A category with labelled defects can tell which model suits it: plain PatchCore (s*) where
defects are local, the fused score where whole-image changes matter, stride-4 features where
defects are a few pixels wide, a larger input with mirrored edges where they are smaller still
or touch the edge. Choosing on the same images the figure is reported on would make that
figure optimistic (the best of several noisy estimates), so the figure is cross-fitted:

1. every candidate configuration is fitted on the same bank/held-out split (one seed);
2. each candidate x scorer is scored on *every* held-out normal and labelled defect, each
   normal against every defect by the model calibrated on the other normals (leave-one-out);
   the highest AUROC wins (ties go to the larger margin, then to the earlier, cheaper
   candidate), and the winner is calibrated on every held-out normal;
3. the figure reported is that procedure's, cross-fitted: the validation images are split,
   seeded, into two halves (each defect kind halved on its own), the same choice is made on
   one half and its model, calibrated on that half's normals, is scored on the other, both
   ways round; the two folds' AUROC / AP, overall and per defect kind, are averaged. No image
   is scored by a model chosen or calibrated on it, and each fold's choice rests on half the
   images the stored model's did, so the figure is, if anything, conservative.

Choosing on one half and reporting on the other (what --auto did before) left the choice to
2 labelled images per kind and 4 normals on bench/accuracy.py: a coin toss between candidates
(stripes' tiny defects found on 38 of 90 selection halves). Chosen on every validation image,
--auto took the candidate that suits each texture on 28-29 of 30 draws in float32, 25 of 30 in
bfloat16 (docs/accuracy.md); with 8 held-out normals and 4 defects per kind, what is left is
the few images, not the rule (smoothed, per-kind and weighted criteria were tried there).

Every validation image's path is stored with the choice (``selection_paths``): a run that
scores those images later must not count them (`patchq aggregate` leaves them out), and none
of the held-out normals may stand in for a run's normal images, since all of them chose it.

Scorers are compared from one fit per configuration: the raw parts of every validation image
are kept (FitResult.parts), so patch and fused cost nothing extra.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.layouts import ImageRecord
from common.engine.calibration import calibrated, combine_parts, left_out, with_tails
from common.engine.fit import FitError, FitResult, fit_category, split_holdout, validation_metrics
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore


def fine(config: PatchCoreConfig) -> PatchCoreConfig:
    """The stride-4 grid (few-pixel defects), on an input one step (32 px) larger.

    Measured on bench/accuracy.py (docs/accuracy.md): stride 4 at 256 px found speckle clusters that
    stride 4 at 224 px missed (s* 0.99 vs 0.75), and stride 8 needs 384 px (3-5x the cost) to
    get near. A 256 px stride-4 grid has ~5x the default's patches, so an eighth of the coreset
    ratio keeps its bank below the default's and its scoring at ~1.6x the default's CPU time;
    its greedy coreset costs ~3x the default's (with the default's ratio the stride-4 fit on
    300 elpv cells had not finished after 29 minutes on a busy 2-core machine, against 11).
    """
    crop_from = None if config.crop_from is None else config.crop_from + 32
    return dataclasses.replace(
        config,
        layers=("stage2", "stage3"),
        image_size=config.image_size + 32,
        crop_from=crop_from,
        coreset_ratio=config.coreset_ratio / 8,
    )


def small(config: PatchCoreConfig) -> PatchCoreConfig:
    """Stride 8 alone on an input 12/7 the base's (224 -> 384 px), its edges mirrored outward.

    Measured on bench/accuracy.py's stripes (docs/accuracy.md), whose tiny defects (3-8 px spots,
    1-2 px scratches on 384 px images, half within 2 px of the edge) the default and `fine`
    miss (s* 0.45-0.87): at 384 px the defects inside the image were found but not those at
    the edge, however deep or large the model (384 px with the default layers and bank: 0.95-0.99
    inside, 0.65-0.82 at the edge, 4.5x the default's scoring time). Mirroring the edge (border
    "reflect") fixed that, and cutting the backbone after stage 3 keeps the cost down: tiny s*
    0.92-0.98 and fused 0.92-0.97 on three draws (five test sets), at 1.9-2.6x the default's
    scoring CPU time (fit ~2x). It does not replace `fine`: on the grain texture's speckle it
    gave s* 0.87-0.96 against `fine`'s 0.99-1.00, and its fused score lost whole-image
    rescaling on one draw (0.81-0.88; the global part alone 1.00). The coreset ratio shrinks
    with the patches per image, so the bank stays the base's size.
    """
    size = config.image_size * 12 // 7 // 32 * 32
    crop_from = None if config.crop_from is None else config.crop_from * size // config.image_size
    return dataclasses.replace(
        config,
        layers=("stage3",),
        image_size=size,
        crop_from=crop_from,
        coreset_ratio=config.coreset_ratio * (config.image_size / size) ** 2,
        border="reflect",
    )


def cosine(config: PatchCoreConfig) -> PatchCoreConfig:
    """Cosine neighbours: patch features normalised before the coreset and every search.

    The label-free choice gives them to aligned parts (common/engine/label_free.py: elpv poly
    s* 0.889 vs L2's 0.873); among the labelled candidates, a category whose labels arrive
    after a label-free fit can choose at least what it had.
    """
    return dataclasses.replace(config, distance="cosine")


# name -> the candidate made from the base config. Order is the last tie-break: cheapest first.
CANDIDATES: dict[str, Callable[[PatchCoreConfig], PatchCoreConfig]] = {
    "default": lambda config: config,
    "cosine": cosine,
    "fine": fine,
    "small": small,
}
SCORERS = ("fused", "patch")
MIN_PER_HALF = 2


@dataclass(frozen=True)
class AutoFit:
    """The chosen model and the record of how it was chosen."""

    chosen: str  # "<candidate> <scorer>"
    fit: FitResult  # the chosen candidate's fit
    model: PatchCore  # its model with the chosen scorer, calibrated on every held-out normal
    validation: dict[str, Any]


@dataclass(frozen=True)
class Rows:
    """Indices into a fit's validation normals and defects: what one choice is made on."""

    normal: np.ndarray
    defect: np.ndarray


def can_choose(records: Sequence[ImageRecord], holdout: float, seed: int) -> bool:
    """Whether the validation images suffice for a cross-fitted choice (both halves get
    MIN_PER_HALF normals and defects): where they do not, --auto's default is off."""
    good = [r for r in records if r.split == "train" and r.label == 0]
    n_normal = len(split_holdout(good, holdout, seed)[1])
    n_normal += sum(r.split == "test" and r.label == 0 for r in records)
    n_defect = sum(r.label == 1 for r in records)
    return min(n_normal, n_defect) >= 2 * MIN_PER_HALF


def cross_fit_halves(n_normal: int, defect_kinds: Sequence[str], seed: int) -> tuple[Rows, Rows]:
    """Seeded halves of the validation normals and defects; the first half gets the odd one
    out. Both halves need a few of each, or neither fold's figure means anything.

    Each defect kind is halved on its own (its odd one out going to the first and second
    halves in turn), so that neither half misses a kind by chance: with 4 labelled images of
    each of 9 kinds, an unstratified half held 0-4 of a kind, and a fold's choice or figure
    could leave a kind out."""
    n_defect = len(defect_kinds)
    if min(n_normal, n_defect) < 2 * MIN_PER_HALF:
        raise FitError(
            f"--auto needs at least {2 * MIN_PER_HALF} held-out normals and labelled defects, "
            f"got {n_normal} and {n_defect}; add images or fit without --auto"
        )
    rng = np.random.default_rng(seed)
    normals, defects = rng.permutation(n_normal), rng.permutation(n_defect)
    kinds = np.asarray(defect_kinds)[defects]
    first: list[int] = []
    second: list[int] = []
    odd_to_first = True
    for kind in sorted(set(kinds)):
        members = defects[kinds == kind]  # in shuffled order
        half = (len(members) + odd_to_first) // 2
        first += members[:half].tolist()
        second += members[half:].tolist()
        odd_to_first ^= len(members) % 2 == 1
    half_n = (n_normal + 1) // 2
    return (
        Rows(np.sort(normals[:half_n]), np.sort(np.asarray(first, dtype=int))),
        Rows(np.sort(normals[half_n:]), np.sort(np.asarray(second, dtype=int))),
    )


def fit_auto(
    records: Sequence[ImageRecord],
    base: PatchCoreConfig,
    holdout: float,
    device: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> AutoFit:
    """Fit every candidate, choose on every validation image, report the choice cross-fitted."""
    fits = {
        name: fit_category(records, candidate(base), holdout, device, batch_size, progress)
        for name, candidate in CANDIDATES.items()
    }
    return choose(fits, base.seed + 1)


def choose(fits: dict[str, FitResult], seed: int) -> AutoFit:
    """Pick among fitted candidates (same split, in preference order) by leave-one-out AUROC
    on every validation image; ``seed`` draws the halves the reported figure is cross-fitted on."""
    first = next(iter(fits.values()))
    every = Rows(np.arange(len(first.parts["normal"])), np.arange(len(first.parts["anomalous"])))
    chosen, selection, margins = _pick(fits, every)
    fit, scorer = fits[chosen.split()[0]], chosen.split()[1]
    model = calibrated(fit.model, scorer, fit.parts["normal"][every.normal])
    a, b = cross_fit_halves(len(every.normal), first.defect_kinds, seed)
    folds = [_fold(fits, a, b), _fold(fits, b, a)]
    # The stored model's normal-score quantiles; the figures are the folds'.
    validation = validation_metrics(np.empty(0), np.empty(0), model.calibration)
    validation |= {
        "n_normal": len(every.normal),
        "n_anomalous": len(every.defect),
        "auroc": _mean(fold["auroc"] for fold in folds),
        "average_precision": _mean(fold["average_precision"] for fold in folds),
        "bank_size": fit.validation["bank_size"],
        "bank_images": fit.validation["bank_images"],
        "auto": {
            "chosen": chosen,
            "selection_auroc": selection,
            "selection_margin": margins,
            "n_selection": [len(every.normal), len(every.defect)],
            # Each half scored by the candidate the same procedure chose on the other half.
            "folds": folds,
            # One pooled figure hides a kind the model misses among kinds it finds.
            "report_auroc_by_kind": _mean_by_kind(folds),
            # Every validation image chose the model: a run that scores them later must not
            # count them (`patchq aggregate` leaves them out).
            "selection_paths": selection_paths(fit),
        },
    }  # fmt: skip
    return AutoFit(chosen, fit, model, validation)


def _pick(fits: dict[str, FitResult], rows: Rows) -> tuple[str, dict[str, float], dict[str, float]]:
    """The best candidate x scorer on ``rows`` by leave-one-out AUROC (ties: the larger
    margin, then the earlier, cheaper candidate), and every one's AUROC and margin."""
    selection: dict[str, float] = {}
    margins: dict[str, float] = {}
    for name, fit in fits.items():
        for scorer in SCORERS:
            key = f"{name} {scorer}"
            selection[key], margins[key] = selection_figures(fit, scorer, rows)
    order = list(selection)
    chosen = max(order, key=lambda k: (selection[k], margins[k], -order.index(k)))
    return chosen, selection, margins


def _fold(fits: dict[str, FitResult], choose_on: Rows, report_on: Rows) -> dict[str, Any]:
    """One fold of the cross-fitted figure: the candidate chosen on ``choose_on`` (calibrated
    on its normals), scored on ``report_on``, which played no part in that choice."""
    chosen = _pick(fits, choose_on)[0]
    fit, scorer = fits[chosen.split()[0]], chosen.split()[1]
    model = with_tails(fit.model, scorer, fit.parts["normal"][choose_on.normal])
    normal = combine_parts(model, fit.parts["normal"][report_on.normal])
    defect = combine_parts(model, fit.parts["anomalous"][report_on.defect])
    metrics = validation_metrics(normal, defect, np.empty(0))
    kinds = np.asarray(fit.defect_kinds)[report_on.defect]
    return {
        "chosen": chosen,
        "auroc": metrics["auroc"],
        "average_precision": metrics["average_precision"],
        "auroc_by_kind": _auroc_by_kind(normal, defect, kinds),
        "n_report": [len(normal), len(defect)],
    }


def _mean_by_kind(folds: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each defect kind's AUROC averaged over the folds that scored it: a kind of one image
    lies in one half, so only the fold reporting on that half has it."""
    kinds = sorted({kind for fold in folds for kind in fold["auroc_by_kind"]})
    return {
        kind: _mean(fold["auroc_by_kind"][kind] for fold in folds if kind in fold["auroc_by_kind"])
        for kind in kinds
    }


def _mean(values: Iterable[float]) -> float:
    return float(np.mean(list(values)))


def selection_paths(fit: FitResult) -> list[str]:
    """The images the choice was made on, every validation image, as sorted absolute paths."""
    chosen_on = [*fit.row_paths["normal"], *fit.row_paths["anomalous"]]
    return sorted(str(path.absolute()) for path in chosen_on)  # as runs register them


def selection_figures(fit: FitResult, scorer: str, rows: Rows) -> tuple[float, float]:
    """Leave-one-out AUROC on ``rows`` and, for ties, the margin: each normal against every
    defect, both scored by the model calibrated on the *other* normals.

    Scored in-sample, a normal never falls beyond the tails fitted to it (demo poly: 0.94 on
    the calibration normals, 0.67 on new ones), and the choice would favour whichever candidate
    overfits its few normals most. Scoring only the normal left out, and the defects by the
    model calibrated on every normal, compared scores of two models: with 4 normals a fused
    score's left-out normal met tails fitted to 3, the defects tails fitted to 4, and --auto
    chose plain s* on a draw of stripes whose whole-image defects only the fused score sees
    (global AUROC 0.58 vs 1.00 for the default).

    The margin is the mean of (defect - normal) over those pairs in units of the normals' own
    spread, so it compares scorers of different units. With 2-4 defects per kind the images
    often separate perfectly under several candidates; the AUROC tie then went to the
    cheapest, on the grain benchmark the default's s*, which ranked its 2 speckles first by
    chance and new ones at chance (0.50) where the stride-4 candidates found them (0.82-0.99)."""
    selection = fit.parts["normal"][rows.normal]
    defects = fit.parts["anomalous"][rows.defect]
    model = with_tails(fit.model, scorer, selection)
    normals, gaps = [], []
    for i, others in enumerate(left_out(model, selection)):
        normal = combine_parts(others, selection[i : i + 1])[0]
        normals.append(normal)
        gaps.append(combine_parts(others, defects) - normal)
    gap = np.concatenate(gaps)
    return _auroc(gap), float(gap.mean() / max(float(np.std(normals)), 1e-12))


def _auroc_by_kind(normal: np.ndarray, defect: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    """AUROC of the normals' scores against each defect kind's (``kinds``: one per defect)."""
    return {
        str(kind): _auroc(defect[kinds == kind][:, None] - normal[None, :])
        for kind in sorted(set(kinds))
    }


def _auroc(gap: np.ndarray) -> float:
    """AUROC from the (defect - normal) score differences of every pair: the share of pairs
    ranked right, ties counted half."""
    return float(np.mean(gap > 0) + 0.5 * np.mean(gap == 0))
