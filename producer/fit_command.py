"""`patchq fit`: learn each category's normal appearance and store the model in the database."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from common.data.layouts import ImageRecord, discover, summarize
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.fit import DEFAULT_HOLDOUT, FitResult, fit_category
from common.engine.patchcore import PatchCoreConfig
from common.errors import PatchqError
from common.settings import Settings
from common.store.database import open_database, store_model
from producer.fit_update import add_update_arguments, run_update


class FitCommandError(PatchqError):
    """`patchq fit` was called without what it needs."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="build a model per category from train/good images",
        description=(
            "Build a PatchCore memory bank per category from ROOT/<category>/train/good, holding "
            "out a share of the good images; score the held-out images and the labelled defects "
            "(train/bad or MVTec test/<defect>) for validation figures the bank never saw. "
            "The model is stored in the database (PATCHQ_DATABASE_URL)."
        ),
    )
    parser.add_argument("--data", type=Path, help="data root (seed or MVTec layout)")
    add_model_arguments(parser)
    add_update_arguments(parser)
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that may fit a model (fit, run, demo)."""
    default = PatchCoreConfig()
    group = parser.add_argument_group("model")
    group.add_argument(
        "--category", action="append", help="category to fit (repeatable; default: all)"
    )
    group.add_argument(
        "--backbone",
        default=default.backbone,
        help="efficientnet_lite0 (default), efficientnet_lite1, efficientnet_lite2, "
        "wide_resnet50_2 (needs torchvision's cached weights or --weights)",
    )
    group.add_argument("--layers", help="comma-separated stages (default: stride 8 + 16 stages)")
    group.add_argument("--weights", help="backbone weight file (state dict) instead of the default")
    group.add_argument("--image-size", type=int, default=default.image_size, help="input size")
    group.add_argument(
        "--crop-from", type=int, help="seed recipe: resize to this size, then centre-crop"
    )
    group.add_argument("--projection-dim", type=int, help="reduce patch features to this size")
    group.add_argument(
        "--coreset-ratio", type=float, default=default.coreset_ratio, help="share kept in the bank"
    )
    group.add_argument("--max-bank", type=int, help="random subsample cap instead of the coreset")
    group.add_argument(
        "--index",
        default=default.index,
        choices=("auto", "flat", "hnsw", "ivf"),
        help="bank search index (default auto: exact flat below 8,192 patches, else IVF)",
    )
    group.add_argument(
        "--neighbors", type=int, default=1, help="b of the paper's score reweighting (1 = off)"
    )
    group.add_argument(
        "--scorer",
        default=default.scorer,
        choices=("patch", "global", "fused"),
        help="image score: patch (max patch distance), global (whole-image statistics) or "
        "fused (both, each normalised by the held-out normals; default)",
    )
    group.add_argument(
        "--tile-size", type=int, help="score overlapping tiles of this size (multiple of 32)"
    )
    group.add_argument(
        "--tile-overlap", type=int, default=default.tile_overlap, help="overlap between tiles"
    )
    group.add_argument(
        "--precision",
        default=default.precision,
        choices=("auto", "float32", "bfloat16"),
        help="backbone arithmetic (default auto: bfloat16 where the CPU/GPU has it natively)",
    )
    group.add_argument(
        "--holdout",
        type=float,
        default=DEFAULT_HOLDOUT,
        help="share of good images kept out of the bank for calibration (default 0.2)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the holdout split and sampler")
    group.add_argument(
        "--batch-size", type=int, help="images per batch (default: PATCHQ_BATCH_SIZE, 32)"
    )
    group.add_argument("--device", help="auto, cpu or cuda[:N] (default: PATCHQ_DEVICE or auto)")


def config_from_args(args: argparse.Namespace) -> PatchCoreConfig:
    return PatchCoreConfig(
        backbone=args.backbone,
        layers=tuple(args.layers.split(",")) if args.layers else (),
        image_size=args.image_size,
        crop_from=args.crop_from,
        projection_dim=args.projection_dim,
        coreset_ratio=args.coreset_ratio,
        max_bank=args.max_bank,
        index=args.index,
        num_neighbors=args.neighbors,
        scorer=args.scorer,
        tile_size=args.tile_size,
        tile_overlap=args.tile_overlap,
        precision=args.precision,
        weights=args.weights,
        seed=args.seed,
    )


def run(args: argparse.Namespace) -> int:
    if args.update:
        return run_update(args)
    if args.data is None:
        raise FitCommandError("fit needs --data ROOT (or --update CATEGORY --from-run RUN)")
    settings = Settings.load({"device": args.device, "batch_size": args.batch_size})
    records = discover(args.data, args.category)
    print(summarize(records))
    fit_and_store(records, config_from_args(args), settings, args.holdout)
    return 0


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
