"""The model artifact: one versioned file that loads without executing code.

Format ``patchq-model`` version 4 is a NumPy ``.npz`` archive (a zip of ``.npy`` arrays), read with
``allow_pickle=False`` so a hostile file cannot run code:

=====================  ======================================================================
``header``             uint8 bytes of UTF-8 JSON: ``{"format": "patchq-model", "version": 4,
                       "category": str, "config": PatchCoreConfig fields, "preprocessing":
                       {...}, "feature_dim": int, "validation": {...} | null}``
``bank``               float32 (N, D): the memory bank M, coreset-sampled patch features
``calibration``        float32 (n,): image scores of held-out normal images (never in M)
``global_mean``        float32 (2D,): mean pooled statistics of the bank images (optional)
``global_precision``   float32 (2D, 2D): their Ledoit-Wolf shrunk inverse covariance (optional)
``part_calibration``   float32 (n, 3): raw [s*, global, pixel] scores of the held-out normals
                       (optional; (n, 2) in version 2 models, which lack the pixel part)
``pixel_mean``         float32 (4,): mean pixel statistics of the bank images (optional)
``pixel_precision``    float32 (4, 4): their shrunk inverse covariance (optional)
``global_exemplars``   float32 (E, 2D): statistics of images taught by ``fit --update``
                       (optional, with ``global_radius``: float32 (1,), the part's radius r)
``pixel_exemplars``    float32 (E, 4): the same for the pixel part (optional, ``pixel_radius``)
``bank_positions``     int16 (N, 2): the grid cell (row, column) each bank patch came from;
                       present exactly when the config has a ``position_radius``
=====================  ======================================================================

Exemplars (common/engine/global_scorer.py) were added to version 4 without a version bump: a
model without them scores exactly as before, so every older version-4 file reads unchanged. The
cost: a patchq from before them reads an updated model but ignores its exemplars (it scores the
whole-image parts as the model before the update did), so upgrade workers before `fit --update`.
The config's ``tail_scale`` came the same way: a version-4 config without it keeps the
mean-excess tails (PatchCoreConfig.from_dict) and scores as before, while a patchq from before
it refuses a config that has it ("unknown model settings"), so upgrade workers before fitting.
The candidates of issue 23 came the same way: a config without ``distance``,
``position_radius`` and ``top_share`` reads as L2, neighbours anywhere and s* (the dataclass
defaults), so an older file scores exactly as before, and a patchq from before them refuses
every config saved since; a cosine model's ``bank`` holds unit vectors, and a position-aware
one adds ``bank_positions``.

The three global arrays come together or not at all; a model without them scores with the
patch scorer only. The two pixel arrays need the global ones. Version 2 (no pixel part) is
read as a two-part model and scores as it did; version 1 (no global arrays, no scorer setting)
as a patch-scorer model. Versions 1-3 lack the config's ``border`` and ``fusion`` fields and
keep scoring as they did (``border="mean"``, ``fusion="max"``, PatchCoreConfig.from_dict).

The same bytes go into the ``models`` table, so a worker on another machine gets the model
from the database; ``artifact_hash`` (SHA-256 of the bytes) names its on-disk cache entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.engine.global_scorer import GlobalScorer
from common.engine.memory_bank import MemoryBank, saved_index
from common.engine.model_config import PatchCoreConfig
from common.engine.model_file import (
    FORMAT,
    VERSION,
    ArtifactError,
    read_arrays,
    read_header,
    write_archive,
)
from common.engine.patchcore import PatchCore, build_extractor, resolve_device
from common.errors import PatchqError

GLOBAL_ARRAYS = ("global_mean", "global_precision", "part_calibration")
PIXEL_ARRAYS = ("pixel_mean", "pixel_precision")


@dataclass(frozen=True)
class ModelArtifact:
    """A fitted model's data, before a backbone is built for it."""

    category: str
    config: PatchCoreConfig
    bank: np.ndarray
    calibration: np.ndarray
    validation: dict[str, Any] | None
    global_scorer: GlobalScorer | None = None
    part_calibration: np.ndarray | None = None
    pixel_scorer: GlobalScorer | None = None
    bank_positions: np.ndarray | None = None


def artifact_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_artifact(
    model: PatchCore, category: str, validation: dict[str, Any] | None = None
) -> bytes:
    """Serialise a fitted model to artifact bytes."""
    header = {
        "format": FORMAT,
        "version": VERSION,
        "category": category,
        "config": model.config.to_dict(),
        "preprocessing": model.preprocessing.to_dict(),
        "feature_dim": model.bank.dim,
        "validation": validation,
    }
    arrays = {
        "bank": np.ascontiguousarray(model.bank.vectors, dtype=np.float32),
        "calibration": np.asarray(model.calibration, dtype=np.float32),
    }
    if model.global_scorer is not None:
        arrays |= _scorer_arrays("global", model.global_scorer)
        arrays["part_calibration"] = model.part_calibration
    if model.pixel_scorer is not None:
        arrays |= _scorer_arrays("pixel", model.pixel_scorer)
    if model.config.position_radius is not None:
        arrays["bank_positions"] = _bank_positions(model)
    return write_archive(header, arrays)


def _bank_positions(model: PatchCore) -> np.ndarray:
    """A position-aware model's bank positions; a default model's bank may hold them too, but
    its file stays as it was before them."""
    if model.bank.positions is None:
        raise ArtifactError(
            f"position radius {model.config.position_radius} needs the bank's grid positions, "
            "which this bank lacks; fit the model with the radius"
        )
    return np.asarray(model.bank.positions, np.int16)


def _scorer_arrays(part: str, scorer: GlobalScorer) -> dict[str, np.ndarray]:
    """A whole-image part's arrays, its exemplars only when it has some."""
    arrays = {f"{part}_mean": scorer.mean, f"{part}_precision": scorer.precision}
    if scorer.n_exemplars:
        arrays[f"{part}_exemplars"] = np.asarray(scorer.exemplars, np.float32)
        arrays[f"{part}_radius"] = np.array([scorer.radius], np.float32)
    return arrays


def read_artifact(data: bytes) -> ModelArtifact:
    """Parse and validate artifact bytes without building a backbone."""
    arrays = read_arrays(data)
    header = read_header(arrays["header"])
    bank, calibration = arrays["bank"], arrays["calibration"]
    if bank.ndim != 2 or bank.shape[1] != header.get("feature_dim") or len(bank) == 0:
        raise ArtifactError(
            f"model artifact is inconsistent: bank shape {bank.shape} does not match "
            f"feature_dim {header.get('feature_dim')}; refit the model"
        )
    config = _read_config(header)
    global_scorer, parts = _read_global(arrays)
    pixel_scorer = _read_pixel(arrays, parts)
    if global_scorer is None and config.scorer != "patch":
        raise ArtifactError(
            f"model artifact uses the {config.scorer!r} scorer but lacks its global part; "
            "refit the model"
        )
    positions = _read_positions(arrays, config, len(bank))
    return ModelArtifact(
        header.get("category", ""),
        config,
        bank,
        calibration,
        header.get("validation"),
        global_scorer,
        parts,
        pixel_scorer,
        positions,
    )


def _read_positions(
    arrays: dict[str, np.ndarray], config: PatchCoreConfig, size: int
) -> np.ndarray | None:
    """The bank patches' grid cells: one per bank row, exactly when position-aware."""
    positions = arrays.get("bank_positions")
    if (positions is None) != (config.position_radius is None):
        raise ArtifactError(
            "model artifact's bank positions and position radius do not come together; "
            "refit the model"
        )
    if positions is not None and (positions.shape != (size, 2) or positions.dtype != np.int16):
        raise ArtifactError(
            f"model artifact's bank positions are {positions.dtype} {positions.shape}, not "
            f"int16 ({size}, 2); refit the model"
        )
    return positions


def _read_config(header: dict[str, Any]) -> PatchCoreConfig:
    try:
        config = PatchCoreConfig.from_dict(header["config"])
    except (PatchqError, TypeError, KeyError) as exc:
        raise ArtifactError(
            f"model artifact has an invalid config ({exc}); refit the model"
        ) from exc
    # Version 1 predates the global part: its image score is always s*.
    return dataclasses.replace(config, scorer="patch") if header["version"] == 1 else config


def _read_global(arrays: dict[str, np.ndarray]) -> tuple[GlobalScorer | None, np.ndarray | None]:
    present = [name for name in GLOBAL_ARRAYS if name in arrays]
    if not present:
        return None, None
    if len(present) != len(GLOBAL_ARRAYS):
        raise ArtifactError(
            f"model artifact has {present} but not all of {list(GLOBAL_ARRAYS)}; refit the model"
        )
    return _checked(arrays, "global"), arrays["part_calibration"]


def _read_pixel(arrays: dict[str, np.ndarray], parts: np.ndarray | None) -> GlobalScorer | None:
    """The pixel part: both arrays, a global part, and a third part_calibration column."""
    present = [name for name in PIXEL_ARRAYS if name in arrays]
    if not present:
        return None
    has_three_parts = parts is not None and parts.ndim == 2 and parts.shape[1] == 3
    if len(present) != len(PIXEL_ARRAYS) or not has_three_parts:
        raise ArtifactError(
            f"model artifact has {present} without all of {list(PIXEL_ARRAYS)} and 3-part "
            "calibration; refit the model"
        )
    return _checked(arrays, "pixel")


def _checked(arrays: dict[str, np.ndarray], part: str) -> GlobalScorer:
    """A whole-image part from its arrays; exemplars and radius come together or not at all."""
    exemplars, radius = arrays.get(f"{part}_exemplars"), arrays.get(f"{part}_radius")
    if (exemplars is None) != (radius is None) or (radius is not None and radius.shape != (1,)):
        raise ArtifactError(
            f"model artifact's {part} exemplars and radius do not come together; refit the model"
        )
    scorer = GlobalScorer(
        arrays[f"{part}_mean"],
        arrays[f"{part}_precision"],
        exemplars,
        0.0 if radius is None else float(radius[0]),
    )
    try:
        scorer.check()
    except PatchqError as exc:
        raise ArtifactError(f"model artifact is inconsistent: {exc}") from exc
    return scorer


def load_artifact(data: bytes, device: str = "auto") -> PatchCore:
    """Build a ready-to-score model from artifact bytes; checks the backbone's feature size."""
    artifact = read_artifact(data)
    target = resolve_device(device)
    extractor = build_extractor(artifact.config, target)
    size = artifact.config.input_size
    dim = extractor(torch.zeros(1, 3, size, size, device=target)).shape[-1]
    if dim != artifact.bank.shape[1]:
        raise ArtifactError(
            f"model artifact does not match its backbone: bank has {artifact.bank.shape[1]}-dim "
            f"features, {artifact.config.backbone} {artifact.config.layers} gives {dim}; refit"
        )
    bank = MemoryBank(
        artifact.bank,
        index=saved_index(artifact.config.index, len(artifact.bank)),
        device=target.type,
        positions=artifact.bank_positions,
    )
    return PatchCore(
        artifact.config,
        extractor,
        bank,
        artifact.calibration,
        artifact.global_scorer,
        artifact.part_calibration,
        artifact.pixel_scorer,
    )
