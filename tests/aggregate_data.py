"""A small real run for the aggregator tests: fitted models, scored images, rows in the DB.

Two categories of 64-px synthetic images, fitted and scored in-process with the real engine:
"tex" in the MVTec layout (test/good, test/<defect> with masks) and "cell" in the seed layout
(train/bad labelled, test/ unlabelled). The run also holds tex's train/good images, which
may be in the memory bank, so the aggregator must leave them out of its metrics.
tests/conftest.py loads this module as a plugin, so its `dataset` fixture is there for every
test module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from common.data.batches import decode_batch
from common.data.layouts import ImageRecord, discover
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore
from common.store.connection import init_db
from common.store.image_rows import ImageRow, register_images
from common.store.model_rows import store_model
from common.store.run_rows import create_run
from common.store.schema import Image
from common.store.score_rows import upsert_scores
from synthetic.layouts import make_mvtec_layout, make_seed_layout

CONFIG = PatchCoreConfig(image_size=64, coreset_ratio=0.25)


@dataclass(frozen=True)
class ScoredCategory:
    artifact: bytes
    records: list[ImageRecord]  # the images the run scores
    scores: np.ndarray
    patch_maps: np.ndarray
    embeddings: np.ndarray
    calibration: np.ndarray


def build_dataset(root: Path) -> dict[str, ScoredCategory]:
    """Fit both categories and score their run images (a few seconds on a CPU)."""
    make_mvtec_layout(root, "tex", n_train=12, n_test_good=6, n_per_defect=4)
    make_seed_layout(root, "cell", n_good=12, n_bad=6, n_test=4)
    dataset = {}
    for category in ("tex", "cell"):
        records = discover(root, [category])
        result = fit_category(records, CONFIG, holdout=0.25, device="cpu", progress=False)
        run_records = records if category == "tex" else [r for r in records if r.label != 0]
        dataset[category] = _score(result.model, category, run_records)
    return dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ScoredCategory]:
    """build_dataset once per pytest process for every module that aggregates, reports or maps a
    real run. Its arrays are made read-only: a test changing them would change its neighbours'."""
    built = build_dataset(tmp_path_factory.mktemp("data"))
    for scored in built.values():
        for array in (scored.scores, scored.patch_maps, scored.embeddings, scored.calibration):
            array.flags.writeable = False
    return built


def _score(model: PatchCore, category: str, records: list[ImageRecord]) -> ScoredCategory:
    decoded = decode_batch([r.path for r in records], model.preprocessing)
    assert not decoded.failures
    batch = model.score_tensors(decoded.tensor)
    return ScoredCategory(
        save_artifact(model, category),
        records,
        batch.image_scores,
        batch.patch_maps,
        batch.embeddings,
        model.calibration,
    )


def populate(engine: Engine, dataset: dict[str, ScoredCategory], name: str = "r1") -> int:
    """Store the models, a run with every image, and their scores; returns the run id."""
    init_db(engine)
    with Session(engine) as session, session.begin():
        run_id = create_run(session, name, "synthetic", batch_size=8)
        for category, scored in dataset.items():
            model_id = store_model(
                session,
                category,
                scored.artifact,
                artifact_hash(scored.artifact),
                CONFIG.backbone,
                CONFIG.to_dict(),
                None,
                1,
            )
            rows: list[ImageRow] = [
                {
                    "category": category,
                    "path": str(r.path),
                    "model_id": model_id,
                    "split": r.split,
                    "label": r.label,
                    "defect_type": r.defect_type,
                    "mask_path": None if r.mask_path is None else str(r.mask_path),
                }
                for r in scored.records
            ]
            register_images(session, run_id, rows)
        session.flush()
        by_path = dict(
            session.execute(select(Image.path, Image.id).where(Image.run_id == run_id)).all()
        )
        upsert_scores(
            session,
            [
                {
                    "run_id": run_id,
                    "image_id": by_path[str(r.path)],
                    "category": category,
                    "score": float(scored.scores[i]),
                    "patch_map": scored.patch_maps[i],
                    "embedding": scored.embeddings[i],
                    "worker": "test",
                    "duration_ms": 1.0,
                }
                for category, scored in dataset.items()
                for i, r in enumerate(scored.records)
            ],
        )
    return run_id
