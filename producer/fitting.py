"""Fitting and storing models: the part of `patchq fit` (and `run`, `demo`) that needs torch."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from common.data.layouts import ImageRecord
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import FitResult, fit_category
from common.engine.patchcore import PatchCoreConfig
from common.settings import Settings
from common.store.database import open_database, store_model


def fit_and_store(
    records: Sequence[ImageRecord],
    config: PatchCoreConfig,
    settings: Settings,
    holdout: float,
) -> dict[str, int]:
    """Fit every category in ``records``, store each model; returns category -> model id."""
    with open_database(settings.database_url) as (engine, _):
        return {
            category: _fit_one(engine, [r for r in records if r.category == category], config,
                               settings, holdout)
            for category in sorted({r.category for r in records})
        }  # fmt: skip


def _fit_one(
    engine: Engine,
    records: Sequence[ImageRecord],
    config: PatchCoreConfig,
    settings: Settings,
    holdout: float,
) -> int:
    """Fit one category's model, store it, print what a quality engineer needs; its id."""
    category = records[0].category
    print(f"\nfitting {category} ({config.backbone}, {config.image_size} px)")
    result = fit_category(records, config, holdout, settings.device, settings.batch_size)
    data = save_artifact(result.model, category, result.validation)
    with Session(engine) as session, session.begin():
        model_id = store_model(
            session,
            category=category,
            artifact_bytes=data,
            content_hash=artifact_hash(data),
            backbone=config.backbone,
            config=config.to_dict(),
            validation=result.validation,
            bank_size=result.model.bank.size,
        )
    print(describe_fit(result, model_id))
    return model_id


def describe_fit(result: FitResult, model_id: int) -> str:
    """One paragraph a quality engineer can read: bank, held-out figures, skipped files."""
    v = result.validation
    auroc = "n/a" if v["auroc"] is None else f"{v['auroc']:.3f}"
    ap = "n/a" if v["average_precision"] is None else f"{v['average_precision']:.3f}"
    t = result.timings
    lines = [
        f"{result.category}: model {model_id}, bank {v['bank_size']:,} patches "
        f"from {v['bank_images']} images "
        f"(features {t['features_s']:.1f} s, coreset {t['coreset_s']:.1f} s)",
        f"  held-out validation (images not in the bank): AUROC {auroc}  AP {ap}  "
        f"({v['n_normal']} normal, {v['n_anomalous']} defective)",
    ]
    if result.skipped:
        first = next(iter(result.skipped.values()))
        lines.append(f"  skipped {len(result.skipped)} unreadable images, e.g. {first}")
    return "\n".join(lines)
