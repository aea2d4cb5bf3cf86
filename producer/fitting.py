"""Fitting and storing models: the part of `patchq fit` (and `run`, `demo`) that needs torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from common.data.layouts import ImageRecord
from common.data.locations import ObjectUri, to_location
from common.engine.artifact import artifact_hash, save_artifact
from common.engine.auto import can_choose, fit_auto
from common.engine.ensemble import fit_ensemble, save_ensemble
from common.engine.fit import DEFAULT_HOLDOUT, fit_category
from common.engine.label_free import can_choose_label_free, fit_label_free
from common.engine.model_config import PatchCoreConfig
from common.formatting import format_figure
from common.settings import Settings
from common.store.connection import open_database
from common.store.model_rows import store_model
from common.store.reviews import reviewed_defect_paths

# The defect kind of an image a reviewer marked defect: --auto halves it like any kind.
REVIEWED = "reviewed"


@dataclass(frozen=True)
class FitPlan:
    """What to fit per category: one config, --auto's candidates, or an ensemble's members."""

    config: PatchCoreConfig
    holdout: float = DEFAULT_HOLDOUT
    auto: bool | None = None  # None: auto where there are images enough to choose on
    members: tuple[PatchCoreConfig, ...] = ()  # an ensemble's member configs


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


def with_reviewed_defects(
    records: Sequence[ImageRecord], reviewed: Sequence[str]
) -> list[ImageRecord]:
    """``records`` with the readable images reviewers marked defect as labelled defects (kind
    ``REVIEWED``), each replacing the record the layout gave it: a train/good image marked
    defect leaves the bank, an unlabelled test image becomes labelled."""
    category = records[0].category
    found = (to_location(p) for p in reviewed)
    marked = {p.absolute() for p in found if isinstance(p, ObjectUri) or p.is_file()}
    kept = [r for r in records if r.path.absolute() not in marked]
    return kept + [ImageRecord(p, category, "train", 1, REVIEWED) for p in sorted(marked, key=str)]


def fit_model(records: Sequence[ImageRecord], plan: FitPlan, settings: Settings) -> Fitted:
    """Fit one category as the plan says: an ensemble, --auto's choice or the one config."""
    category, config = records[0].category, plan.config
    device, batch = settings.device, settings.batch_size
    if plan.members:
        ensemble = fit_ensemble(records, plan.members, plan.holdout, device, batch)
        data = save_ensemble(ensemble.ensemble, category, ensemble.validation)
        size = sum(m.bank.size for m in ensemble.ensemble.members)
        skipped = {p: r for member in ensemble.members for p, r in member.skipped.items()}
        summary = f"ensemble of {len(plan.members)} members"
        return Fitted(data, ensemble.validation, size, summary, skipped)
    labelled = can_choose(records, plan.holdout, config.seed)
    auto = plan.auto
    if auto is None:  # the default: choose wherever there are images enough to choose on
        auto = labelled or can_choose_label_free(records, plan.holdout, config.seed)
    if auto:
        choose = fit_auto if labelled else fit_label_free
        chosen = choose(records, config, plan.holdout, device, batch)
        if labelled:  # what a run's report says chose the model
            chosen.validation["auto"]["labelled_defects"] = _label_sources(records)
        data = save_artifact(chosen.model, category, chosen.validation)
        summary = f"--auto: {chosen.chosen}" + ("" if labelled else ", no labelled defects")
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
    with Session(engine) as session:
        reviewed = reviewed_defect_paths(session, category)
    records = with_reviewed_defects(records, reviewed)
    n_reviewed = sum(r.defect_type == REVIEWED for r in records)
    if n_reviewed:
        print(f"{n_reviewed} images marked defect in `patchq review` join the labelled defects")
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
    if "search" in v:
        lines.append(_describe_search(v["search"], v["n_normal"] + v["n_anomalous"]))
    if v.get("auto", {}).get("chosen_on") == "synthesised":
        lines += _describe_label_free(v["auto"], v["bank_images"] + v["n_normal"])
    elif "auto" in v:
        lines += _describe_auto(v["auto"])
    if fitted.skipped:
        first = next(iter(fitted.skipped.values()))
        lines.append(f"  skipped {len(fitted.skipped)} unreadable images, e.g. {first}")
    return "\n".join(lines)


def _describe_search(search: dict[str, Any], validated: int) -> str:
    """The approximate search's accuracy cost against the exact one on the same images (on a
    sample of them for a large bank: fit.audit_stride)."""
    recall, change = search["recall_at_1"], search["max_image_score_change"]
    auroc = search["auroc_change"]
    sample = search.get("audited_images", validated)  # older models audited every image
    return (
        f"  {search['index']} search against exact on "
        f"{'them' if sample == validated else f'{sample} of them'}: "
        f"recall@1 {format_figure(recall)}, "
        f"patch scores within {'n/a' if change is None else f'{change:.2%}'}"
        + ("" if auroc is None else f", AUROC change {auroc:+.4f}")
    )


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
    sources = auto.get("labelled_defects")
    if sources:
        lines.append(
            f"  its labelled defects: {sources['folder']} from the data folder, "
            f"{sources['review']} marked defect in `patchq review`"
        )
    by_kind = auto["report_auroc_by_kind"]
    if len(by_kind) > 1:
        weakest_first = sorted(by_kind.items(), key=lambda item: item[1])
        lines.append(
            "  cross-fitted by defect kind, weakest first: "
            + ", ".join(f"{kind} {format_figure(a)}" for kind, a in weakest_first)
        )
    return lines


def _label_sources(records: Sequence[ImageRecord]) -> dict[str, int]:
    """How many labelled defects came from the data folder and how many from review."""
    defects = [r for r in records if r.label == 1]
    from_review = sum(r.defect_type == REVIEWED for r in defects)
    return {"folder": len(defects) - from_review, "review": from_review}


def _describe_label_free(auto: dict[str, Any], good_images: int) -> list[str]:
    """How --auto chose without labelled defects: what decided, and the candidates' figures on
    synthesised defects, which are no validation of the model on real ones."""
    share = auto["positional_share"]
    figures = auto["synthesised_auroc"]
    if auto["aligned"]:
        why = f"its parts are aligned (position explains {share:.2f} of the feature variance)"
    else:
        local = ", ".join(f"{name} {format_figure(f['local'])}" for name, f in figures.items())
        compared = auto.get("compared_on_good_images", good_images)  # older models: all
        sample = f" (on fits of {compared:,} of the {good_images:,} good images)"
        why = (
            f"a texture (position explains {share:.2f} of the feature variance); "
            f"synthesised local defects ranked{sample if compared < good_images else ''}: {local}"
        )
    lines = [
        f"  --auto chose {auto['chosen']} without labelled defects: {why}",
        f"  figures on {auto['n_synthesised']} synthesised defects pasted on copies of the "
        "held-out normals (not a validation; label defects in `patchq review` to get one):",
    ]
    for name, by_kind in figures.items():
        kinds = ", ".join(f"{kind} {format_figure(a)}" for kind, a in by_kind.items())
        lines.append(f"    {name}: {kinds}")
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
