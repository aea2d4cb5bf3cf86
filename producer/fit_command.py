"""`patchq fit`: learn each category's normal appearance and store the model in the database."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.data.layouts import discover, summarize
from common.data.locations import to_location
from common.errors import PatchqError
from common.settings import Settings

if TYPE_CHECKING:
    from common.engine.model_config import PatchCoreConfig
    from producer.fitting import FitPlan


class FitCommandError(PatchqError):
    """`patchq fit` was called without what it needs."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit",
        help="build a model per category from train/good images",
        description=(
            "Build a PatchCore memory bank per category from ROOT/<category>/train/good, holding "
            "out a share of the good images; score the held-out images and the labelled defects "
            "(train/bad, train/bad/<kind>/ or MVTec test/<defect>) for validation figures the "
            "bank never saw; with --auto, figures per defect kind too. "
            "The model is stored in the database (PATCHQ_DATABASE_URL)."
        ),
    )
    parser.add_argument(
        "--data",
        type=to_location,
        help="data root (seed or MVTec layout): a folder or s3://bucket/root",
    )
    add_model_arguments(parser)
    add_update_arguments(parser)
    parser.set_defaults(run=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by every command that may fit a model (fit, run, demo).

    A model flag left out is None and leaves PatchCoreConfig's default in place, so that
    building the parser (`--help`) never imports the model code, and torch with it.
    """
    group = parser.add_argument_group("model")
    group.add_argument(
        "--category", action="append", help="category to fit (repeatable; default: all)"
    )
    group.add_argument(
        "--backbone",
        help="efficientnet_lite0 (default), efficientnet_lite1, efficientnet_lite2, "
        "wide_resnet50_2 (needs torchvision's cached weights or --weights)",
    )
    group.add_argument("--layers", help="comma-separated stages (default: stride 8 + 16 stages)")
    group.add_argument("--weights", help="backbone weight file (state dict) instead of the default")
    group.add_argument("--image-size", type=int, help="input size")
    group.add_argument(
        "--crop-from", type=int, help="seed recipe: resize to this size, then centre-crop"
    )
    group.add_argument("--projection-dim", type=int, help="reduce patch features to this size")
    group.add_argument("--coreset-ratio", type=float, help="share kept in the bank")
    group.add_argument("--max-bank", type=int, help="random subsample cap instead of the coreset")
    group.add_argument(
        "--index",
        choices=("auto", "flat", "hnsw", "ivf", "ivfpq"),
        help="bank search index (default auto: exact flat below 8,192 patches, IVF below "
        "262,144, else IVF-PQ re-ranked exactly)",
    )
    group.add_argument(
        "--neighbors", type=int, default=1, help="b of the paper's score reweighting (1 = off)"
    )
    group.add_argument(
        "--scorer",
        choices=("patch", "global", "fused"),
        help="image score: patch (max patch distance), global (whole-image statistics) or "
        "fused (both, each normalised by the held-out normals; default)",
    )
    group.add_argument(
        "--tile-size", type=int, help="score overlapping tiles of this size (multiple of 32)"
    )
    group.add_argument("--tile-overlap", type=int, help="overlap between tiles")
    group.add_argument(
        "--border",
        help="patches at the image edge: zeros (default, the paper's padding), reflect (mirrored "
        "edges: defects a few pixels from the edge; stride 16 or finer), mean (older models)",
    )
    group.add_argument(
        "--distance",
        choices=("l2", "cosine"),
        help="patch distance: l2 (default, the paper's) or cosine (unit patch features; helped "
        "aligned solar cells, hurt fine textures)",
    )
    group.add_argument(
        "--position-radius",
        type=int,
        metavar="N",
        help="compare a patch only with bank patches from grid cells within N cells of its own "
        "(aligned parts); default: anywhere",
    )
    group.add_argument(
        "--top-share",
        type=float,
        metavar="S",
        help="image score: mean of the largest share S of patch distances, e.g. 0.01 "
        "(default: the largest one, s*)",
    )
    group.add_argument(
        "--precision",
        choices=("auto", "float32", "bfloat16"),
        help="backbone arithmetic (default auto: bfloat16 where the CPU/GPU has it natively)",
    )
    group.add_argument(
        "--holdout",
        type=float,
        help="share of good images kept out of the bank for calibration (default 0.2)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the holdout split and sampler")
    group.add_argument(
        "--auto",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose the model per category. With labelled defects: the configuration and "
        "scorer with the best AUROC on every held-out normal and labelled defect, reported "
        "cross-fitted (made on one half, scored on the other). Without: cosine neighbours "
        "where the parts are aligned, else the stride-4 candidate where it ranks defects "
        "synthesised on held-out normals better than the default (figures on synthesised "
        "defects, never validation). Default: on where the category has 4 held-out normals "
        "and 4 labelled defects, or 8 held-out normals; --no-auto fits the default model "
        "(docs/accuracy.md)",
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


def add_update_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("update from review")
    group.add_argument(
        "--update",
        metavar="CATEGORY",
        help="add the patches of images reviewed normal in --from-run to CATEGORY's latest "
        "model (no refit) and store it as a new version; --holdout of them are kept out "
        "for the before/after validation",
    )
    group.add_argument("--from-run", metavar="RUN", help="run (id or name) whose verdicts to use")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with the model flags' --device and --batch-size over PATCHQ_* (fit, run, demo)."""
    return Settings.load({"device": args.device, "batch_size": args.batch_size})


def config_from_args(args: argparse.Namespace) -> PatchCoreConfig:
    from common.engine.model_config import PatchCoreConfig

    given = {
        "backbone": args.backbone,
        "layers": tuple(args.layers.split(",")) if args.layers else None,
        "image_size": args.image_size,
        "crop_from": args.crop_from,
        "projection_dim": args.projection_dim,
        "coreset_ratio": args.coreset_ratio,
        "max_bank": args.max_bank,
        "index": args.index,
        "num_neighbors": args.neighbors,
        "scorer": args.scorer,
        "tile_size": args.tile_size,
        "tile_overlap": args.tile_overlap,
        "border": args.border,
        "precision": args.precision,
        "weights": args.weights,
        "seed": args.seed,
        "distance": args.distance,
        "position_radius": args.position_radius,
        "top_share": args.top_share,
    }
    return PatchCoreConfig(**{name: value for name, value in given.items() if value is not None})


def holdout_from_args(args: argparse.Namespace) -> float:
    from common.engine.fit import DEFAULT_HOLDOUT

    return DEFAULT_HOLDOUT if args.holdout is None else args.holdout


def plan_from_args(args: argparse.Namespace) -> FitPlan:
    """What the model flags ask to fit (fit, run, demo); bad --ensemble-member specs fail here,
    before any fit."""
    from producer.fitting import FitPlan  # here: --help must not load torch

    config = config_from_args(args)
    members = ensemble_members(config, args.ensemble_member or ())
    return FitPlan(config, holdout_from_args(args), args.auto, members)


def ensemble_members(config: PatchCoreConfig, specs: Sequence[str]) -> tuple[PatchCoreConfig, ...]:
    """Member configs from LAYERS[@SIZE] specs, the other settings taken from ``config``; none
    without specs (no ensemble)."""
    if not specs:
        return ()
    members = []
    for spec in specs:
        layers, _, size = spec.partition("@")
        try:
            changes: dict[str, Any] = {"layers": tuple(filter(None, layers.split(",")))}
            if size:
                changes["image_size"] = int(size)
        except ValueError:
            raise FitCommandError(
                f"ensemble member {spec!r} is not LAYERS[@SIZE], e.g. stage2,stage3@320"
            ) from None
        members.append(dataclasses.replace(config, **changes))
    if len(members) < 2:
        raise FitCommandError("an ensemble needs at least 2 --ensemble-member flags")
    return tuple(members)


def run(args: argparse.Namespace) -> int:
    if args.update:
        return update(args)
    if args.data is None:
        raise FitCommandError("fit needs --data ROOT (or --update CATEGORY --from-run RUN)")
    settings = settings_from_args(args)
    records = discover(args.data, args.category)
    print(summarize(records))
    from producer.fitting import fit_and_store  # here: --help must not load torch

    fit_and_store(records, plan_from_args(args), settings)
    return 0


def update(args: argparse.Namespace) -> int:
    """`fit --update CATEGORY --from-run RUN`: teach the model the false alarms reviewed in RUN."""
    if not args.from_run:
        raise FitCommandError(
            "--update needs --from-run RUN: the run whose review verdicts to learn"
        )
    settings = settings_from_args(args)
    from producer.fit_update import run_update  # here: --help must not load torch

    run_update(
        category=args.update,
        from_run=args.from_run,
        holdout=holdout_from_args(args),
        seed=args.seed,
        settings=settings,
    )
    return 0
