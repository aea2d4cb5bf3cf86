"""A model that scores nothing, for the feed ceiling: what claim, decode and write cost alone.

It answers like the real model it stands in for (same preprocessing, same patch grid and
embedding size, so the rows written are as large), in no time: whatever images/s a worker
reaches with it is the most any backbone, on any GPU, can get out of that worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import torch

from common.engine.ensemble import Ensemble
from common.engine.memory_bank import MemoryBank
from common.engine.patchcore import PatchCore, ScoreBatch
from common.scoring.model_cache import ModelProvider


class NoOpModel:
    """Stands in for a model where scoring uses one: `preprocessing`, `with_banks`,
    `score_tensors` (common.scoring.stages)."""

    def __init__(self, model: PatchCore | Ensemble, probe: torch.Tensor) -> None:
        shape = model.score_tensors(probe[:1])
        self.preprocessing = model.preprocessing
        self._grid = shape.patch_maps.shape[1:]
        self._dim = shape.embeddings.shape[1]

    def with_banks(self, wrap: Callable[[MemoryBank], MemoryBank]) -> NoOpModel:
        return self  # no bank is searched, so there is nothing to wrap

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
