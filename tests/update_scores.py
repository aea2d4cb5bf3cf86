"""Scores of `fit --update`'s images under the model before and after the update (tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.engine.bank_update import image_scores
from common.engine.patchcore import PatchCore
from producer.fit_update import ReviewedImages


@dataclass(frozen=True)
class UpdateScores:
    """The update's images (taught) and its held-out reviewed images, each scored twice."""

    taught: list[Path]
    held_normal: list[Path]
    held_defect: list[Path]
    old: dict[Path, float]
    new: dict[Path, float]


def update_scores(before: PatchCore, after: PatchCore, split: ReviewedImages) -> UpdateScores:
    taught = [r.path for r in split.update]
    held_normal = [r.path for r in split.validation if r.label == 0]
    held_defect = [r.path for r in split.validation if r.label == 1]
    assert taught and held_normal and held_defect
    paths = taught + held_normal + held_defect
    return UpdateScores(
        taught,
        held_normal,
        held_defect,
        image_scores(before, paths, 8),
        image_scores(after, paths, 8),
    )
