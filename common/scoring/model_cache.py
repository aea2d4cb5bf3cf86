"""The per-process model cache: ready-to-score models by id, artifacts cached on disk.

Models are fetched from the database once per process, kept on disk by content hash and built
lazily in the process that scores, never in a parent that forks.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from common.engine.artifact import artifact_hash
from common.engine.ensemble import Ensemble, load_model
from common.engine.patchcore import PatchCore
from common.store.model_rows import load_model_bytes, model_content_hash

DEFAULT_CACHED_MODELS = 3
log = logging.getLogger(__name__)


class ModelProvider:
    """Ready-to-score models by id: an LRU of a few in memory, artifacts cached on disk.

    A worker that scores several categories keeps the last `capacity` models built; the
    artifact bytes are read from the database only when the disk cache lacks them (checked by
    content hash, so a truncated cache file is fetched again). Threads of one process share
    it safely. The provider belongs to the process that created it: after a fork it drops
    what it holds rather than share CUDA or FAISS state with its parent.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        cache_dir: Path,
        device: str = "auto",
        capacity: int = DEFAULT_CACHED_MODELS,
    ) -> None:
        self._sessions = session_factory
        self._cache_dir = Path(cache_dir)
        self._device = device
        self._capacity = max(1, capacity)
        self._models: OrderedDict[int, PatchCore | Ensemble] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()  # a pipelined worker asks from several threads

    def get(self, model_id: int) -> PatchCore | Ensemble:
        """The model, built on first use in this process (once, whichever thread asks)."""
        with self._lock:
            return self._get(model_id)

    def _get(self, model_id: int) -> PatchCore | Ensemble:
        if os.getpid() != self._pid:
            self._models.clear()
            self._pid = os.getpid()
        model = self._models.get(model_id)
        if model is None:
            model = load_model(self._artifact_bytes(model_id), self._device)
            self._models[model_id] = model
            while len(self._models) > self._capacity:
                self._models.popitem(last=False)
        self._models.move_to_end(model_id)
        return model

    def _artifact_bytes(self, model_id: int) -> bytes:
        with self._sessions() as session:
            content_hash = model_content_hash(session, model_id)
            cached = self._cache_dir / f"{content_hash}.npz"
            if cached.is_file():
                data = cached.read_bytes()
                if artifact_hash(data) == content_hash:
                    return data
            data, content_hash = load_model_bytes(session, model_id)
        self._write_cache(self._cache_dir / f"{content_hash}.npz", data)
        return data

    @staticmethod
    def _write_cache(path: Path, data: bytes) -> None:
        """Write via a temporary file and rename, so concurrent workers never read half a file.

        The cache only saves database reads: a folder that cannot be written is logged, and
        scoring goes on with the bytes already in memory.
        """
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as f:
                tmp = Path(f.name)
                f.write(data)
            os.replace(tmp, path)
        except OSError as error:
            log.warning("model cache %s not written (%s); set PATCHQ_MODEL_CACHE_DIR", path, error)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
