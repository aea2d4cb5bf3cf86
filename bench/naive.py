"""The straightforward PatchCore a notebook would write: the reference patchq is measured against.

Same backbone and patch features as patchq, but the notebook's choices everywhere else: every
training patch, a random subsample capped at 120,000 instead of a coreset, an exact
``IndexFlatL2`` on the CPU, and one ``search`` call per image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from common.data.images import Preprocessing, load_rgb
from common.engine.features import PatchFeatureExtractor

NAIVE_BANK_CAP = 120_000


class NaivePatchCore:
    """Fit and score exactly as the naive recipe does."""

    def __init__(
        self, extractor: PatchFeatureExtractor, preprocessing: Preprocessing, index: faiss.Index
    ):
        self.extractor = extractor
        self.preprocessing = preprocessing
        self.index = index

    @classmethod
    def fit(
        cls,
        extractor: PatchFeatureExtractor,
        preprocessing: Preprocessing,
        paths: Sequence[Path],
        seed: int = 0,
    ) -> NaivePatchCore:
        features = np.concatenate([_features(extractor, preprocessing, p) for p in paths])
        if len(features) > NAIVE_BANK_CAP:
            chosen = np.random.default_rng(seed).choice(len(features), NAIVE_BANK_CAP, False)
            features = features[chosen]
        index = faiss.IndexFlatL2(features.shape[1])
        index.add(np.ascontiguousarray(features, dtype=np.float32))
        return cls(extractor, preprocessing, index)

    def score(self, path: Path) -> float:
        """Image score = max over patches of the L2 distance to the nearest bank patch."""
        squared, _ = self.index.search(_features(self.extractor, self.preprocessing, path), 1)
        return float(np.sqrt(squared.max()))


def _features(
    extractor: PatchFeatureExtractor, preprocessing: Preprocessing, path: Path
) -> np.ndarray:
    patches = extractor(preprocessing.to_tensor(load_rgb(path))[None]).numpy()
    return patches.reshape(-1, patches.shape[-1])


@torch.inference_mode()
def score_all(model: NaivePatchCore, paths: Sequence[Path]) -> tuple[np.ndarray, float]:
    """Scores of ``paths`` one image at a time, and seconds per image."""
    start = time.perf_counter()
    scores = np.array([model.score(p) for p in paths], dtype=np.float32)
    return scores, (time.perf_counter() - start) / max(1, len(paths))
