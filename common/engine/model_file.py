"""The outer layer of the two model files, and what aggregation reads of them, without torch.

A model artifact (common/engine/artifact.py) and an ensemble file (common/engine/ensemble.py)
are ``.npz`` archives with a JSON header; their formats are documented there. Writing and
opening that outer layer, checking the header and combining the members' held-out normals only
needs NumPy, so it lives here: `patchq aggregate` reads every stored model's reference
(`read_model_reference`) and must not import torch or FAISS, which took about 1 GB of its memory
(issue 12). Building a scorer from the same bytes (backbone, bank, global parts) stays with the
engine.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.data.images import Preprocessing
from common.engine.normalise import Normaliser
from common.errors import PatchqError

FORMAT = "patchq-model"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
ENSEMBLE_FORMAT = "patchq-ensemble"
ENSEMBLE_VERSION = 1


class ArtifactError(PatchqError):
    """A model artifact that is corrupt, of another format or version, or inconsistent."""


class EnsembleError(PatchqError):
    """Members that cannot be combined, or a damaged ensemble file."""


# What np.load raises for bytes that are not a readable .npz archive.
NOT_AN_ARCHIVE = (OSError, ValueError, zipfile.BadZipFile, EOFError)


def write_archive(header: dict[str, Any], arrays: Mapping[str, np.ndarray]) -> bytes:
    """A model file's bytes: ``header`` as UTF-8 JSON in a uint8 array first, then ``arrays``."""
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return buffer.getvalue()


def _archive(data: bytes) -> dict[str, np.ndarray]:
    """Every array of an .npz archive, read without pickle."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def read_arrays(data: bytes) -> dict[str, np.ndarray]:
    """A model artifact's arrays, header included (still as bytes)."""
    try:
        arrays = _archive(data)
    except NOT_AN_ARCHIVE as exc:
        raise ArtifactError(f"model artifact is corrupt or not a patchq model ({exc})") from exc
    missing = {"header", "bank", "calibration"} - set(arrays)
    if missing:
        raise ArtifactError(f"model artifact lacks {sorted(missing)}; refit the model")
    return arrays


def read_header(raw: np.ndarray) -> dict[str, Any]:
    """A model artifact's JSON header, checked to be of a format and version this patchq reads."""
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model artifact header is not valid JSON ({exc})") from exc
    if header.get("format") != FORMAT:
        raise ArtifactError(f"not a patchq model artifact (format {header.get('format')!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(
            f"model artifact version {header.get('version')} is not supported by this patchq "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}); "
            "refit the model or upgrade patchq"
        )
    return header


def read_ensemble_file(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """An ensemble file's arrays and header (its format is not checked here)."""
    try:
        arrays = _archive(data)
        header = json.loads(arrays["header"].tobytes().decode())
    except (*NOT_AN_ARCHIVE, KeyError) as exc:
        raise EnsembleError(f"ensemble file is corrupt or not a patchq ensemble ({exc})") from exc
    return arrays, header


def is_ensemble(data: bytes) -> bool:
    """Whether model bytes are an ensemble file (else they are read as a single model)."""
    try:
        return read_ensemble_file(data)[1].get("format") == ENSEMBLE_FORMAT
    except EnsembleError:
        return False


def ensemble_members(data: bytes) -> list[bytes]:
    """Each member's artifact bytes, after checking the ensemble header."""
    arrays, header = read_ensemble_file(data)
    if header.get("format") != ENSEMBLE_FORMAT or header.get("version") != ENSEMBLE_VERSION:
        raise EnsembleError(
            f"not a {ENSEMBLE_FORMAT} version {ENSEMBLE_VERSION} file (got "
            f"{header.get('format')!r} version {header.get('version')}); refit the ensemble or "
            "upgrade patchq"
        )
    try:
        return [arrays[f"member_{i}"].tobytes() for i in range(int(header["members"]))]
    except (KeyError, ValueError) as exc:
        raise EnsembleError(f"ensemble member is missing or damaged ({exc}); refit") from exc


def combine_members(
    member_scores: Sequence[np.ndarray], member_calibrations: Sequence[np.ndarray]
) -> np.ndarray:
    """Mean over members of each member's scores as z-scores of its held-out normals."""
    normalised = [
        Normaliser.from_scores(calibration)(scores)
        for scores, calibration in zip(member_scores, member_calibrations, strict=True)
    ]
    return np.mean(normalised, axis=0).astype(np.float32)


def ensemble_calibration(member_calibrations: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's held-out normal scores: its combined score of the members' ones."""
    return combine_members(member_calibrations, member_calibrations)


def largest_input(preprocessings: Sequence[Preprocessing]) -> Preprocessing:
    return max(preprocessings, key=lambda p: p.image_size)


def held_out_patch_maxima(
    part_calibration: np.ndarray | None, calibration: np.ndarray, scorer: str
) -> np.ndarray:
    """s* (largest patch distance) of the normal images fit held out of the bank, whichever
    score the model reports; empty when the model kept none.

    Models with whole-image parts keep the raw s* as the first column of ``part_calibration``;
    a patch-scorer model's ``calibration`` is s* itself. (With eq. 7 reweighting, b > 1, s* is
    the reweighted maximum, slightly below the largest distance; with ``top_share`` it is the
    mean of the largest share of patch distances, below the largest too.)
    """
    if part_calibration is not None and len(part_calibration):
        return np.asarray(part_calibration[:, 0], np.float64)
    if scorer == "patch":
        return np.asarray(calibration, np.float64)
    return np.empty(0)


@dataclass(frozen=True)
class ModelReference:
    """What aggregation needs of a stored model: its held-out normal scores, the held-out s*
    (the anomaly maps' scale), its preprocessing and the settings that name its score."""

    calibration: np.ndarray
    normal_patch_maxima: np.ndarray
    preprocessing: Preprocessing
    ensemble: bool
    scorer: str = "patch"
    fusion: str = "max"
    num_neighbors: int = 1
    distance: str = "l2"
    position_radius: int | None = None
    top_share: float | None = None


def read_model_reference(data: bytes) -> ModelReference:
    """The reference of either kind of model file, no backbone built and no torch imported.

    An ensemble's score is not a patch distance: it has no s* reference."""
    if is_ensemble(data):
        members = [read_model_reference(member) for member in ensemble_members(data)]
        return ModelReference(
            calibration=ensemble_calibration([m.calibration for m in members]),
            normal_patch_maxima=np.empty(0),
            preprocessing=largest_input([m.preprocessing for m in members]),
            ensemble=True,
        )
    arrays = read_arrays(data)
    header = read_header(arrays["header"])
    try:
        config, preprocessing = header["config"], Preprocessing.from_dict(header["preprocessing"])
        # Version 1 predates the global part (its score is s*), versions 1-3 the tail fusions;
        # PatchCoreConfig.from_dict reads old files the same way.
        scorer = "patch" if header["version"] == 1 else str(config["scorer"])
        fusion, neighbors = str(config.get("fusion", "max")), int(config["num_neighbors"])
        # Before issue 23's candidates: L2, neighbours anywhere, s*.
        distance, radius = str(config.get("distance", "l2")), config.get("position_radius")
        top_share = config.get("top_share")
    except (PatchqError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(
            f"model artifact has an invalid config ({exc}); refit the model"
        ) from exc
    calibration = arrays["calibration"]
    parts = arrays.get("part_calibration")
    return ModelReference(
        calibration=calibration,
        normal_patch_maxima=held_out_patch_maxima(parts, calibration, scorer),
        preprocessing=preprocessing,
        ensemble=False,
        scorer=scorer,
        fusion=fusion,
        num_neighbors=neighbors,
        distance=distance,
        position_radius=None if radius is None else int(radius),
        top_share=None if top_share is None else float(top_share),
    )
