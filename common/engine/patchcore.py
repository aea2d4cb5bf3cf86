"""The PatchCore model: patch features of a frozen backbone scored against a memory bank.

Symbols follow Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022):
the memory bank M holds coreset-sampled patch features of normal images; a test image's patch
features P(x_test) are each scored by the distance to their nearest neighbour in M, and the image
score s* is the largest of those distances (eq. 6), optionally reweighted by how isolated the
nearest bank patch m* is among its b neighbours (eq. 7).

Beyond the paper (issue 6): whole-image parts (common/engine/global_scorer.py) score the pooled
statistics of the same patch features and, for colour cast and blur, which the features are
built to ignore, the input pixels' statistics. The ``scorer`` setting picks the image score:
``patch`` (s*), ``global`` (Mahalanobis distance of the feature statistics) or ``fused`` (every
part turned into a tail probability against the held-out normals, common/engine/normalise.py,
then combined by the config's ``fusion`` test). Large images can be scored as tiles
(common/engine/tiling.py).

Candidates beyond the paper (issue 23), each off by default: ``distance="cosine"`` compares
L2-normalised patch features (search_vectors), ``position_radius`` only lets a patch match bank
patches from nearby grid cells (common/engine/position_search.py), and ``top_share`` pools the
largest share of the patch distances instead of taking s* alone (pool_patch_distances).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from common.engine.backbones import load_backbone
from common.engine.features import PatchFeatureExtractor
from common.engine.global_scorer import GlobalScorer, image_statistics, pooled_statistics
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.normalise import (
    TAIL_FUSIONS,
    Normaliser,
    TailModel,
    fuse,
    fuse_tail,
)
from common.engine.position_search import grid_positions
from common.engine.tiling import tiled_features
from common.errors import PatchqError


@dataclass(frozen=True)
class ScoreBatch:
    """Scores for a batch: the image score the config's scorer picks, the (h, w) patch
    distance grid, pooled features, and the raw parts (s*, the feature statistics' distance
    and the pixel statistics' distance)."""

    image_scores: np.ndarray
    patch_maps: np.ndarray
    embeddings: np.ndarray
    patch_scores: np.ndarray | None = None
    global_scores: np.ndarray | None = None
    pixel_scores: np.ndarray | None = None


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
    backbone = load_backbone(config.backbone, config.layers, config.input_size, config.weights)
    bfloat16 = use_bfloat16(config.precision, device)
    extractor = PatchFeatureExtractor(
        backbone, projection_dim=config.projection_dim, bfloat16=bfloat16, border=config.border
    )
    return extractor.to(device).eval()


def use_bfloat16(precision: str, device: torch.device) -> bool:
    """Whether the backbone runs in bfloat16: "auto" where the hardware computes it natively
    (CUDA, or CPUs with AVX512-BF16/AMX), since emulated bfloat16 is slower than float32."""
    if precision != "auto":
        return precision == "bfloat16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def search_vectors(config: PatchCoreConfig, patches: np.ndarray) -> np.ndarray:
    """Patch features (..., D) as the bank holds and searches them: as extracted for the "l2"
    distance; L2-normalised (after any projection) for "cosine".

    Cosine is L2 between unit vectors rather than a FAISS inner-product index: for unit a, b,
    ||a - b|| = sqrt(2 - 2 cos(a, b)), a monotone function of the cosine distance 1 - cos, so
    the L2 nearest neighbour is the cosine nearest neighbour (the same ranking) and the patch
    distance orders images as the cosine distance does. Every index (flat, IVF, HNSW, torch,
    GPU), the exact re-ranking, the k-center coreset, eq. 7 and `fit --update`'s coverage
    radius then work unchanged; an inner-product index would need its own metric in each of
    them and returns similarities (higher = nearer) where they all expect distances. The
    whole-image statistics (global_scorer.py) keep the raw features, whose norm they measure.
    """
    if config.distance == "l2":
        return patches
    norms = np.linalg.norm(patches, axis=-1, keepdims=True)
    return patches / np.maximum(norms, np.finfo(np.float32).tiny)


def pool_patch_distances(patch_maps: np.ndarray, top_share: float | None) -> np.ndarray:
    """(B,) image scores from (B, h, w) patch distances: s*, the largest (eq. 6), or with
    ``top_share`` the mean of the ceil(top_share * h * w) largest (top-k pooling), which a
    single noisy patch moves less."""
    flat = patch_maps.reshape(len(patch_maps), -1)
    if top_share is None:
        return flat.max(axis=1)
    # Rounded first, so that e.g. 0.1 * 30 (3.0000000000000004) pools 3 patches, not 4.
    k = max(1, math.ceil(round(top_share * flat.shape[1], 9)))
    largest = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k :]
    return largest.mean(axis=1, dtype=np.float64).astype(np.float32)


def extract_patches(
    extractor: PatchFeatureExtractor, config: PatchCoreConfig, images: torch.Tensor
) -> np.ndarray:
    """(B, 3, S, S) preprocessed images -> (B, h, w, D) patch features, tiled if configured."""
    # Asynchronous when the batch is in pinned memory (a pipelined worker on CUDA).
    images = images.to(next(extractor.parameters()).device, non_blocking=True)
    if config.tile_size is None:
        patches = extractor(images)
    else:
        patches = tiled_features(extractor, images, config.tile_size, config.tile_overlap)
    return patches.float().cpu().numpy()


class PatchCore:
    """A fitted model: feature extractor + memory bank M + held-out normal scores.

    ``calibration`` holds the image scores of normal images that are *not* in M; thresholds
    and score normalisation come from them, never from the bank's own images.
    ``part_calibration`` (n, parts) holds the same images' raw [s*, global(, pixel)] scores,
    from which the fused scorer normalises each part. ``pixel_scorer`` (the input pixels'
    statistics) only comes with a ``global_scorer``; models saved before it have two parts.
    """

    def __init__(
        self,
        config: PatchCoreConfig,
        extractor: PatchFeatureExtractor,
        bank: MemoryBank,
        calibration: np.ndarray,
        global_scorer: GlobalScorer | None = None,
        part_calibration: np.ndarray | None = None,
        pixel_scorer: GlobalScorer | None = None,
    ):
        self.config = config
        self.extractor = extractor
        self.bank = bank
        self.calibration = np.asarray(calibration, dtype=np.float32)
        self.global_scorer = global_scorer
        self.pixel_scorer = pixel_scorer
        n_parts = self.n_parts
        parts = np.empty((0, n_parts)) if part_calibration is None else part_calibration
        self.part_calibration = np.asarray(parts, dtype=np.float32).reshape(-1, n_parts)
        self.preprocessing = config.preprocessing()
        self.device = next(extractor.parameters()).device

    def with_calibration(
        self, calibration: np.ndarray, part_calibration: np.ndarray | None = None
    ) -> PatchCore:
        """The same model with held-out normal scores attached (extractor and bank shared)."""
        parts = self.part_calibration if part_calibration is None else part_calibration
        return PatchCore(
            self.config,
            self.extractor,
            self.bank,
            calibration,
            self.global_scorer,
            parts,
            self.pixel_scorer,
        )

    @property
    def n_parts(self) -> int:
        """Raw score parts: s*, the global distance (0 without a global part), pixel distance."""
        return 3 if self.pixel_scorer is not None else 2

    def with_bank(self, bank: MemoryBank) -> PatchCore:
        """The same model searching ``bank`` (e.g. a wrapper that times the searches)."""
        return PatchCore(
            self.config,
            self.extractor,
            bank,
            self.calibration,
            self.global_scorer,
            self.part_calibration,
            self.pixel_scorer,
        )

    def with_banks(self, wrap: Callable[[MemoryBank], MemoryBank]) -> PatchCore:
        """The same model searching ``wrap(bank)``; an ensemble wraps each member's bank."""
        return self.with_bank(wrap(self.bank))

    def score_tensors(self, images: torch.Tensor) -> ScoreBatch:
        """Score a preprocessed batch (B, 3, S, S)."""
        return self.score_patches(extract_patches(self.extractor, self.config, images), images)

    def score_patches(self, patches: np.ndarray, images: torch.Tensor) -> ScoreBatch:
        """Score a batch from its patch features (B, h, w, D), already extracted from its
        preprocessed ``images``: what the backbone gave can then also be searched in another
        bank (fit's exact-search audit) without running it twice."""
        patch_maps, patch_scores = self.patch_distances(patches)
        global_scores = pixel_scores = None
        if self.global_scorer is not None:
            global_scores = self.global_scorer.score(pooled_statistics(patches))
        if self.pixel_scorer is not None:
            pixel_scores = self.pixel_scorer.score(image_statistics(images))
        return ScoreBatch(
            self.combine(patch_scores, global_scores, pixel_scores),
            patch_maps,
            patches.mean(axis=(1, 2)),
            patch_scores,
            global_scores,
            pixel_scores,
        )

    def patch_distances(self, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The bank's share of a score: each patch's distance to its nearest bank patch, (B, h,
        w) from patch features (B, h, w, D), and the images' patch scores s* (B,) pooled and
        reweighted as configured."""
        b, h, w, d = patches.shape
        flat = search_vectors(self.config, patches.reshape(b * h * w, d))
        distances, nearest = self.nearest(flat, grid_positions(b, h, w))
        patch_maps = distances[:, 0].reshape(b, h, w)
        return patch_maps, self._image_scores(flat.reshape(b, h * w, d), patch_maps, nearest[:, 0])

    def nearest(self, vectors: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each patch's nearest bank patch m*: true distances (M, 1) and bank rows (M, 1), for
        ``vectors`` (search_vectors) from grid ``cells`` (M, 2); with ``position_radius``
        among the bank patches from cells within it (MemoryBank.search_near)."""
        if self.config.position_radius is None:
            return self.bank.search(vectors, k=1)
        return self.bank.search_near(vectors, cells, self.config.position_radius)

    def combine(
        self,
        patch_scores: np.ndarray,
        global_scores: np.ndarray | None,
        pixel_scores: np.ndarray | None = None,
    ) -> np.ndarray:
        """The image score the config's scorer asks for, from the raw parts."""
        if self.config.scorer == "patch":
            return patch_scores
        if global_scores is None:
            raise PatchqError(
                f"scorer {self.config.scorer!r} needs the model's global part, which this model "
                "lacks; refit it"
            )
        if self.config.scorer == "global":
            return global_scores
        parts = self._parts(patch_scores, global_scores, pixel_scores)
        if self.config.fusion in TAIL_FUSIONS:
            return fuse_tail(self.part_log_p(*parts), self.config.fusion)
        return fuse(self.normalise_parts(*parts), self.config.fusion)

    def _parts(
        self,
        patch_scores: np.ndarray,
        global_scores: np.ndarray,
        pixel_scores: np.ndarray | None,
    ) -> list[np.ndarray]:
        parts = [patch_scores, global_scores]
        if self.pixel_scorer is not None:
            if pixel_scores is None:
                raise PatchqError("this model's fused score needs its pixel part's scores")
            parts.append(pixel_scores)
        return parts

    def normalise_parts(self, *scores: np.ndarray) -> np.ndarray:
        """(parts, B) z-scores of each raw part (s*, global(, pixel)) against the held-out
        normals' raw part scores."""
        return self._per_part(Normaliser.from_scores, scores)

    def part_log_p(self, *scores: np.ndarray) -> np.ndarray:
        """(parts, B) log tail probabilities of each raw part under the held-out normals."""
        scale = self.config.tail_scale
        return self._per_part(lambda normals: TailModel.from_scores(normals, scale).log_p, scores)

    def _per_part(
        self,
        fitted: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]],
        scores: tuple[np.ndarray, ...],
    ) -> np.ndarray:
        parts = self._parts(*scores[:2], scores[2] if len(scores) > 2 else None)
        return np.stack([fitted(self.part_calibration[:, i])(s) for i, s in enumerate(parts)])

    def _image_scores(
        self, patches: np.ndarray, patch_maps: np.ndarray, nearest: np.ndarray
    ) -> np.ndarray:
        s_star = pool_patch_distances(patch_maps, self.config.top_share)
        if self.config.num_neighbors == 1:
            return s_star.astype(np.float32)
        b = patch_maps.shape[0]
        worst = patch_maps.reshape(b, -1).argmax(axis=1)
        m_test = patches[np.arange(b), worst]  # m^{test,*}: the most anomalous patch
        m_star = nearest.reshape(b, -1)[np.arange(b), worst]  # its nearest bank patch m*
        return (self._reweight(m_test, m_star) * s_star).astype(np.float32)

    def _reweight(self, m_test: np.ndarray, m_star: np.ndarray) -> np.ndarray:
        """Eq. 7: w = 1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||).

        A test patch whose nearest bank patch sits in a sparse region of M (rare normal
        appearance) gets its score reduced less than one near a dense cluster. N_b(m*) are m*'s
        neighbours anywhere in M, also with ``position_radius``: they measure how dense M is
        around m*, whichever cell the test patch came from.
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
