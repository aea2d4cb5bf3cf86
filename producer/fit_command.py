"""`patchq fit`: learn each category's normal appearance and store the model in the database."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from common.data.layouts import ImageRecord, discover, summarize
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.auto import can_choose, fit_auto
from common.engine.ensemble import fit_ensemble, save_ensemble
from common.engine.fit import DEFAULT_HOLDOUT, fit_category
from common.engine.patchcore import PatchCoreConfig
from common.errors import PatchqError
from common.settings import Settings
from common.store.database import open_database, store_model


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
    parser.add_argument("--data", type=Path, required=True, help="data root (seed or MVTec layout)")
    add_model_arguments(parser)
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
        "--auto",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose the configuration and scorer by held-out validation, report on other "
        "images (default: on where the category has at least 4 held-out normals and 4 "
        "labelled defects; docs/accuracy.md)",
    )
    group.add_argument(
        "--ensemble-member",
        action="append",
        metavar="LAYERS[@SIZE]",
        help="fit an ensemble instead, one member per flag (at least 2), e.g. "
        "--ensemble-member stage3,stage5 --ensemble-member stage2,stage3@320",
    )
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


def ensemble_members(config: PatchCoreConfig, specs: Sequence[str]) -> list[PatchCoreConfig]:
    """Member configs from LAYERS[@SIZE] specs, the other settings taken from ``config``."""
    members = []
    for spec in specs:
        layers, _, size = spec.partition("@")
        try:
            changes: dict[str, Any] = {"layers": tuple(filter(None, layers.split(",")))}
            if size:
                changes["image_size"] = int(size)
        except ValueError:
            raise PatchqError(
                f"ensemble member {spec!r} is not LAYERS[@SIZE], e.g. stage2,stage3@320"
            ) from None
        members.append(dataclasses.replace(config, **changes))
    if len(members) < 2:
        raise PatchqError("an ensemble needs at least 2 --ensemble-member flags")
    return members


@dataclass(frozen=True)
class FitPlan:
    """What to fit per category: one config, --auto's candidates, or an ensemble's members."""

    config: PatchCoreConfig
    holdout: float = DEFAULT_HOLDOUT
    auto: bool | None = None  # None: auto where a category has labelled defects
    members: tuple[str, ...] = ()  # LAYERS[@SIZE] ensemble member specs

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FitPlan:
        members = tuple(args.ensemble_member or ())
        if members:
            ensemble_members(config_from_args(args), members)  # bad specs fail before any fit
        return cls(config_from_args(args), args.holdout, args.auto, members)


@dataclass(frozen=True)
class Fitted:
    """One category's fitted model file and what to store and print about it."""

    data: bytes
    validation: dict[str, Any]
    bank_size: int
    summary: str  # how it was fitted, for the printout
    skipped: dict[Path, str]  # unreadable images and why


def run(args: argparse.Namespace) -> int:
    settings = Settings.load({"device": args.device, "batch_size": args.batch_size})
    records = discover(args.data, args.category)
    print(summarize(records))
    fit_and_store(records, FitPlan.from_args(args), settings)
    return 0


def fit_and_store(
    records: Sequence[ImageRecord], plan: FitPlan, settings: Settings
) -> dict[str, int]:
    """Fit every category in ``records``, store each model; returns category -> model id."""
    with open_database(settings.database_url) as (engine, _):
        return {
            category: _fit_one(engine, [r for r in records if r.category == category], plan,
                               settings)
            for category in sorted({r.category for r in records})
        }  # fmt: skip


def fit_model(records: Sequence[ImageRecord], plan: FitPlan, settings: Settings) -> Fitted:
    """Fit one category as the plan says: an ensemble, --auto's choice or the one config."""
    category, config = records[0].category, plan.config
    device, batch = settings.device, settings.batch_size
    if plan.members:
        members = ensemble_members(config, plan.members)
        ensemble = fit_ensemble(records, members, plan.holdout, device, batch)
        data = save_ensemble(ensemble.ensemble, category, ensemble.validation)
        size = sum(m.bank.size for m in ensemble.ensemble.members)
        skipped = {p: r for member in ensemble.members for p, r in member.skipped.items()}
        summary = f"ensemble of {len(members)} members"
        return Fitted(data, ensemble.validation, size, summary, skipped)
    auto = plan.auto
    if auto is None:  # the default: choose wherever there are enough labelled images to
        auto = can_choose(records, plan.holdout, config.seed)
    if auto:
        chosen = fit_auto(records, config, plan.holdout, device, batch)
        data = save_artifact(chosen.model, category, chosen.validation)
        summary = f"--auto: {chosen.chosen}"
        return Fitted(data, chosen.validation, chosen.model.bank.size, summary, chosen.fit.skipped)
    result = fit_category(records, config, plan.holdout, device, batch)
    data = save_artifact(result.model, category, result.validation)
    summary = f"{config.scorer} scorer"
    return Fitted(data, result.validation, result.model.bank.size, summary, result.skipped)


def _fit_one(
    engine: Engine, records: Sequence[ImageRecord], plan: FitPlan, settings: Settings
) -> int:
    """Fit one category's model, store it, print what a quality engineer needs; its id."""
    category, config = records[0].category, plan.config
    print(f"\nfitting {category} ({config.backbone}, {config.image_size} px)")
    fitted = fit_model(records, plan, settings)
    with Session(engine) as session, session.begin():
        model_id = store_model(
            session,
            category=category,
            artifact_bytes=fitted.data,
            content_hash=artifact_hash(fitted.data),
            backbone=config.backbone,
            config=config.to_dict() | {"fit": fitted.summary},
            validation=fitted.validation,
            bank_size=fitted.bank_size,
        )
    print(describe_fit(category, fitted, model_id))
    return model_id


def describe_fit(category: str, fitted: Fitted, model_id: int) -> str:
    """One paragraph a quality engineer can read: model, held-out figures, how it was chosen."""
    v = fitted.validation
    lines = [
        f"{category}: model {model_id} ({fitted.summary}), bank {fitted.bank_size:,} patches",
        f"  held-out validation (images not in the bank): AUROC {_fmt(v.get('auroc'))}  "
        f"AP {_fmt(v.get('average_precision'))}  "
        f"({v['n_normal']} normal, {v['n_anomalous']} defective)",
    ]
    if "auto" in v:
        auto = v["auto"]
        tried = ", ".join(f"{k} {_fmt(a)}" for k, a in auto["selection_auroc"].items())
        lines.append(
            f"  --auto chose {auto['chosen']} by AUROC on a selection half "
            f"({auto['n_selection'][0]} normal, {auto['n_selection'][1]} defective): {tried}; "
            f"the figure above is on the other half only"
        )
    if fitted.skipped:
        first = next(iter(fitted.skipped.values()))
        lines.append(f"  skipped {len(fitted.skipped)} unreadable images, e.g. {first}")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
