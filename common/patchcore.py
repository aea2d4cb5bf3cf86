"""The PatchCore model: patch features of a frozen backbone scored against a memory bank.

Symbols follow Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022):
the memory bank M holds coreset-sampled patch features of normal images; a test image's patch
features P(x_test) are each scored by the distance to their nearest neighbour in M, and the image
score s* is the largest of those distances (eq. 6), optionally reweighted by how isolated the
nearest bank patch m* is among its b neighbours (eq. 7).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from common.backbones import backbone_spec, load_backbone
from common.errors import PatchqError
from common.features import PatchFeatureExtractor
from common.images import Preprocessing
from common.memory_bank import MemoryBank


@dataclass(frozen=True)
class PatchCoreConfig:
    """Everything that defines a model besides its memory bank; stored in the artifact."""

    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] = ()  # empty: the backbone's default (stride 8 + stride 16)
    image_size: int = 224
    crop_from: int | None = None  # seed recipe: resize to crop_from, centre-crop image_size
    projection_dim: int | None = None
    coreset_ratio: float = 0.1
    max_bank: int | None = None  # seed recipe: random subsample cap instead of the coreset
    index: str = "flat"
    num_neighbors: int = 1  # b in eq. 7; 1 = plain max distance, no reweighting
    weights: str | None = None  # weight file, "random" (tests only), or None for the default
    seed: int = 0

    def __post_init__(self) -> None:
        spec = backbone_spec(self.backbone)
        if not self.layers:
            object.__setattr__(self, "layers", spec.default_layers)
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.image_size < 32 or self.image_size % 32:
            raise PatchqError(f"image size must be a multiple of 32, got {self.image_size}")
        if not 0 < self.coreset_ratio <= 1:
            raise PatchqError(f"coreset ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.num_neighbors < 1:
            raise PatchqError(f"num_neighbors must be at least 1, got {self.num_neighbors}")

    def preprocessing(self) -> Preprocessing:
        spec = backbone_spec(self.backbone)
        return Preprocessing(
            image_size=self.image_size, crop_from=self.crop_from, mean=spec.mean, std=spec.std
        )

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PatchCoreConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PatchqError(f"unknown model settings {sorted(unknown)}; is patchq too old?")
        values = dict(data)
        values["layers"] = tuple(values.get("layers", ()))  # type: ignore[arg-type]
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ScoreBatch:
    """Scores for a batch: s* per image, the (h, w) patch distance grid, pooled features."""

    image_scores: np.ndarray
    patch_maps: np.ndarray
    embeddings: np.ndarray


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PatchqError(
            f"device {device!r} requested but CUDA is not available; use --device cpu"
        )
    return torch.device(device)


def build_extractor(config: PatchCoreConfig, device: torch.device) -> PatchFeatureExtractor:
    """The frozen feature extractor a config describes, on ``device``."""
    backbone = load_backbone(config.backbone, config.layers, config.image_size, config.weights)
    return PatchFeatureExtractor(backbone, projection_dim=config.projection_dim).to(device).eval()


class PatchCore:
    """A fitted model: feature extractor + memory bank M + held-out normal scores.

    ``calibration`` holds the scores of normal images that are *not* in M; thresholds and
    score normalisation come from them, never from the bank's own images.
    """

    def __init__(
        self,
        config: PatchCoreConfig,
        extractor: PatchFeatureExtractor,
        bank: MemoryBank,
        calibration: np.ndarray,
    ):
        self.config = config
        self.extractor = extractor
        self.bank = bank
        self.calibration = np.asarray(calibration, dtype=np.float32)
        self.preprocessing = config.preprocessing()
        self.device = next(extractor.parameters()).device

    def with_calibration(self, calibration: np.ndarray) -> PatchCore:
        """The same model with held-out normal scores attached (extractor and bank shared)."""
        return PatchCore(self.config, self.extractor, self.bank, calibration)

    def score_tensors(self, images: torch.Tensor) -> ScoreBatch:
        """Score a preprocessed batch (B, 3, S, S)."""
        patches = self.extractor(images.to(self.device)).float().cpu().numpy()
        b, h, w, d = patches.shape
        flat = patches.reshape(b * h * w, d)
        distances, nearest = self.bank.search(flat, k=1)
        patch_maps = distances[:, 0].reshape(b, h, w)
        image_scores = self._image_scores(flat.reshape(b, h * w, d), patch_maps, nearest[:, 0])
        return ScoreBatch(image_scores, patch_maps, patches.mean(axis=(1, 2)))

    def _image_scores(
        self, patches: np.ndarray, patch_maps: np.ndarray, nearest: np.ndarray
    ) -> np.ndarray:
        b = patch_maps.shape[0]
        flat_maps = patch_maps.reshape(b, -1)
        s_star = flat_maps.max(axis=1)
        if self.config.num_neighbors == 1:
            return s_star.astype(np.float32)
        worst = flat_maps.argmax(axis=1)
        m_test = patches[np.arange(b), worst]  # m^{test,*}: the most anomalous patch
        m_star = nearest.reshape(b, -1)[np.arange(b), worst]  # its nearest bank patch m*
        return (self._reweight(m_test, m_star) * s_star).astype(np.float32)

    def _reweight(self, m_test: np.ndarray, m_star: np.ndarray) -> np.ndarray:
        """Eq. 7: w = 1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||).

        A test patch whose nearest bank patch sits in a sparse region of M (rare normal
        appearance) gets its score reduced less than one near a dense cluster.
        """
        bank_vectors = self.bank.vectors
        _, neighbourhood = self.bank.search(bank_vectors[m_star], k=self.config.num_neighbors)
        diffs = bank_vectors[neighbourhood] - m_test[:, None, :]
        dists = np.sqrt((diffs.astype(np.float64) ** 2).sum(axis=-1))  # (B, b)
        to_star = np.linalg.norm((bank_vectors[m_star] - m_test).astype(np.float64), axis=1)
        # Subtract the row max before exponentiating: same ratio, no overflow.
        shift = dists.max(axis=1, keepdims=True)
        ratio = np.exp(to_star[:, None] - shift)[:, 0] / np.exp(dists - shift).sum(axis=1)
        return 1.0 - ratio
