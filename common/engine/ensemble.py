"""Ensembles: several PatchCore models judging the same image, each on its own scale.

Members may differ in backbone (Lite0/1/2, WRN-50), layers or input size. Their raw scores
have unrelated units, so averaging them raw lets the member with the largest distances decide.
Each member's image score is first turned into a z-score against that member's held-out normal
scores (common/engine/normalise.py), and the ensemble score is the mean of those z-scores; the patch
maps are normalised the same way (by the member's s* on the held-out normals), resized to the
first member's grid and averaged.

Members are fitted with the same seed and holdout share, so they hold out the same normal
images and their calibration arrays line up image by image; the ensemble's own calibration is
the combined score of those images.

File format ``patchq-ensemble`` version 1: an ``.npz`` (read with ``allow_pickle=False``) with
``header`` (UTF-8 JSON: format, version, category, members, validation) and ``member_<i>``,
each the uint8 bytes of an ordinary ``patchq-model`` artifact (common/engine/artifact.py), so every
member is validated exactly as a single model is.

An ensemble is a model like any other on the fleet: its file goes into the ``models`` table,
``load_model`` turns either kind of file into a scorer (workers, common/scoring/), and
common/engine/model_file.py reads the file and the held-out normal scores of either kind
without torch, for aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.data.images import Preprocessing
from common.data.layouts import ImageRecord
from common.engine.artifact import ArtifactError, load_artifact, read_artifact, save_artifact
from common.engine.fit import FitResult, fit_category, validation_metrics
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.model_file import ENSEMBLE_FORMAT as FORMAT
from common.engine.model_file import ENSEMBLE_VERSION as VERSION
from common.engine.model_file import (
    EnsembleError,
    combine_members,
    ensemble_calibration,
    ensemble_members,
    is_ensemble,
    largest_input,
    write_archive,
)
from common.engine.normalise import Normaliser
from common.engine.patchcore import PatchCore, ScoreBatch


def _patch_calibration(member: PatchCore) -> np.ndarray:
    """Held-out normal s* of a member: the raw patch part, whatever its image scorer."""
    return member.part_calibration[:, 0] if len(member.part_calibration) else member.calibration


class Ensemble:
    """Scores like a PatchCore model: ``preprocessing`` + ``score_tensors`` + ``calibration``."""

    def __init__(self, members: Sequence[PatchCore]):
        if len(members) < 2:
            raise EnsembleError(f"an ensemble needs at least 2 members, got {len(members)}")
        if any(m.config.crop_from is not None for m in members):
            raise EnsembleError("ensemble members must resize the whole image (no --crop-from)")
        if len({len(m.calibration) for m in members}) != 1:
            raise EnsembleError(
                "ensemble members were calibrated on different held-out images; "
                "fit them with the same seed and holdout share"
            )
        self.members = list(members)
        # Decode once at the largest member size; smaller members are resized from it.
        self.preprocessing = largest_input([m.preprocessing for m in members])
        self.calibration = ensemble_calibration([m.calibration for m in members])

    def with_banks(self, wrap: Callable[[MemoryBank], MemoryBank]) -> Ensemble:
        """The same ensemble with every member searching ``wrap(its bank)`` (e.g. timed)."""
        return Ensemble([m.with_banks(wrap) for m in self.members])

    def score_tensors(self, images: torch.Tensor) -> ScoreBatch:
        """Score a batch preprocessed with ``self.preprocessing``."""
        results = [
            m.score_tensors(_adapt(images, self.preprocessing, m.preprocessing))
            for m in self.members
        ]
        image_scores = combine_members(
            [r.image_scores for r in results], [m.calibration for m in self.members]
        )
        grid = results[0].patch_maps.shape[1:]
        maps = [
            _resize(Normaliser.from_scores(_patch_calibration(m))(r.patch_maps), grid)
            for m, r in zip(self.members, results, strict=True)
        ]
        return ScoreBatch(image_scores, np.mean(maps, axis=0), results[0].embeddings)


def _adapt(images: torch.Tensor, source: Preprocessing, target: Preprocessing) -> torch.Tensor:
    """Re-express a batch preprocessed for ``source`` as ``target`` would have made it."""
    if source == target:
        return images
    pixels = images * _channel(source.std) + _channel(source.mean)
    if target.image_size != source.image_size:
        size = (target.image_size, target.image_size)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True)
    return (pixels - _channel(target.mean)) / _channel(target.std)


def _channel(values: tuple[float, float, float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[None, :, None, None]


def _resize(maps: np.ndarray, grid: tuple[int, ...]) -> np.ndarray:
    if maps.shape[1:] == grid:
        return maps
    tensor = torch.from_numpy(np.ascontiguousarray(maps, np.float32))[:, None]
    return F.interpolate(tensor, size=grid, mode="bilinear", align_corners=False)[:, 0].numpy()


@dataclass(frozen=True)
class EnsembleFit:
    ensemble: Ensemble
    validation: dict[str, Any]
    members: list[FitResult]


def fit_ensemble(
    records: Sequence[ImageRecord],
    configs: Sequence[PatchCoreConfig],
    holdout: float,
    device: str = "auto",
    batch_size: int = 32,
    progress: bool = True,
) -> EnsembleFit:
    """Fit every member on the same split; validate the combined score on held-out images."""
    if len({c.seed for c in configs}) > 1:
        raise EnsembleError(
            "ensemble members must share one seed, so they hold out the same images"
        )
    fits = [fit_category(records, c, holdout, device, batch_size, progress) for c in configs]
    ensemble = Ensemble([f.model for f in fits])
    calibrations = [f.model.calibration for f in fits]
    normal = combine_members([f.scores["normal"] for f in fits], calibrations)
    anomalous = combine_members([f.scores["anomalous"] for f in fits], calibrations)
    return EnsembleFit(ensemble, validation_metrics(normal, anomalous, ensemble.calibration), fits)


def save_ensemble(
    ensemble: Ensemble, category: str, validation: dict[str, Any] | None = None
) -> bytes:
    header = {
        "format": FORMAT,
        "version": VERSION,
        "category": category,
        "members": len(ensemble.members),
        "validation": validation,
    }
    members = {
        f"member_{i}": np.frombuffer(save_artifact(member, category), np.uint8)
        for i, member in enumerate(ensemble.members)
    }
    return write_archive(header, members)


def load_ensemble(data: bytes, device: str = "auto") -> Ensemble:
    """Build an ensemble from its file; each member is checked like a single model artifact."""
    return Ensemble([load_artifact(member, device) for member in _member_bytes(data)])


def _member_bytes(data: bytes) -> list[bytes]:
    """Each member's artifact bytes, after checking the ensemble header and each member."""
    members = ensemble_members(data)
    try:
        for member in members:
            read_artifact(member)
    except ArtifactError as exc:
        raise EnsembleError(f"ensemble member is missing or damaged ({exc}); refit") from exc
    return members


def load_model(data: bytes, device: str = "auto") -> PatchCore | Ensemble:
    """A ready scorer from the bytes of either kind of model file the models table holds."""
    return load_ensemble(data, device) if is_ensemble(data) else load_artifact(data, device)
