"""Fitting and storing models: the part of `patchq fit` (and `run`, `demo`) that needs torch."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from common.data.layouts import ImageRecord
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.auto import can_choose, fit_auto
from common.engine.ensemble import fit_ensemble, save_ensemble
from common.engine.fit import DEFAULT_HOLDOUT, fit_category
from common.engine.patchcore import PatchCoreConfig
from common.formatting import format_figure
from common.settings import Settings
from common.store.database import open_database, store_model
from producer.fit_command import FitCommandError, config_from_args, holdout_from_args


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
            raise FitCommandError(
                f"ensemble member {spec!r} is not LAYERS[@SIZE], e.g. stage2,stage3@320"
            ) from None
        members.append(dataclasses.replace(config, **changes))
    if len(members) < 2:
        raise FitCommandError("an ensemble needs at least 2 --ensemble-member flags")
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
        return cls(config_from_args(args), holdout_from_args(args), args.auto, members)


@dataclass(frozen=True)
class Fitted:
    """One category's fitted model file and what to store and print about it."""

    data: bytes
    validation: dict[str, Any]
    bank_size: int
    summary: str  # how it was fitted, for the printout
    skipped: dict[Path, str]  # unreadable images and why


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
        f"  held-out validation (images not in the bank): {held_out_figures(v)}",
    ]
    if "auto" in v:
        lines += _describe_auto(v["auto"])
    if fitted.skipped:
        first = next(iter(fitted.skipped.values()))
        lines.append(f"  skipped {len(fitted.skipped)} unreadable images, e.g. {first}")
    return "\n".join(lines)


def _describe_auto(auto: dict[str, Any]) -> list[str]:
    """How --auto chose, and how the figure above was made without judging the choice on the
    images it was made on."""
    selection = auto["selection_auroc"]
    tried = ", ".join(f"{k} {format_figure(a)}" for k, a in selection.items())
    tied = sum(a == selection[auto["chosen"]] for a in selection.values()) > 1
    how = "AUROC (a tie, broken by the larger margin)" if tied else "AUROC"
    n_normal, n_defect = auto["n_selection"]
    folds = " and ".join(fold["chosen"] for fold in auto["folds"])
    lines = [
        f"  --auto chose {auto['chosen']} by {how} on every held-out image "
        f"({n_normal} normal, {n_defect} defective, each normal left out in turn): {tried}",
        "  the figure above is cross-fitted: the same choice made on one half of those images "
        f"and scored on the other, both ways round (it chose {folds})",
    ]
    by_kind = auto["report_auroc_by_kind"]
    if len(by_kind) > 1:
        weakest_first = sorted(by_kind.items(), key=lambda item: item[1])
        lines.append(
            "  cross-fitted by defect kind, weakest first: "
            + ", ".join(f"{kind} {format_figure(a)}" for kind, a in weakest_first)
        )
    return lines


def held_out_figures(validation: dict[str, Any], note: str = "") -> str:
    """The validation figures fit stored with a model and the images behind them, as `fit` and
    `run` print them; ``note`` goes inside the parentheses."""
    return (
        f"AUROC {format_figure(validation.get('auroc'))}  "
        f"AP {format_figure(validation.get('average_precision'))}  "
        f"({validation.get('n_normal', 0)} normal, "
        f"{validation.get('n_anomalous', 0)} defective{note})"
    )
