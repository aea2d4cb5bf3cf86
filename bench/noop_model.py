"""A model that scores nothing, for the feed ceiling: what claim, decode and write cost alone.

It answers like the real model it stands in for (same preprocessing, same patch grid and
embedding size, so the rows written are as large), in no time: whatever images/s a worker
reaches with it is the most any backbone, on any GPU, can get out of that worker.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from common.engine.patchcore import PatchCore, ScoreBatch
from common.scoring.model_cache import ModelProvider


class NoOpModel:
    """Stands in for a PatchCore: `preprocessing`, `bank`, `with_bank`, `score_tensors`."""

    def __init__(self, model: PatchCore, probe: torch.Tensor) -> None:
        shape = model.score_tensors(probe[:1])
        self.preprocessing = model.preprocessing
        self.bank = model.bank
        self._grid = shape.patch_maps.shape[1:]
        self._dim = shape.embeddings.shape[1]

    def with_bank(self, bank: object) -> NoOpModel:
        return self

    def score_tensors(self, images: torch.Tensor) -> ScoreBatch:
        b = images.shape[0]
        return ScoreBatch(
            np.zeros(b, np.float32),
            np.zeros((b, *self._grid), np.float32),
            np.zeros((b, self._dim), np.float32),
        )


class NoOpProvider:
    """Hands out a `NoOpModel` of each of `provider`'s models (built when first asked)."""

    def __init__(self, provider: ModelProvider, probe: torch.Tensor) -> None:
        self._real = provider
        self._probe = probe
        self._noop: dict[int, NoOpModel] = {}
        self._lock = threading.Lock()

    def get(self, model_id: int) -> PatchCore:
        with self._lock:
            if model_id not in self._noop:
                self._noop[model_id] = NoOpModel(self._real.get(model_id), self._probe)
            return self._noop[model_id]  # type: ignore[return-value]
