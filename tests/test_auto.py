"""`fit --auto`: chosen on every validation image, its figure cross-fitted on two halves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.data.layouts import discover
from common.engine.auto import (
    CANDIDATES,
    SCORERS,
    AutoFit,
    Rows,
    can_choose,
    choose,
    cross_fit_halves,
    fine,
    small,
)
from common.engine.calibration import calibrated
from common.engine.fit import FitError, FitResult, fit_category
from common.engine.model_config import PatchCoreConfig
from common.errors import PatchqError
from synthetic.layouts import make_seed_layout

BASE = PatchCoreConfig(image_size=64, coreset_ratio=0.25)


def test_the_halves_are_disjoint_seeded_and_complete() -> None:
    a, b = cross_fit_halves(9, ["bad"] * 12, seed=3)
    assert set(a.normal).isdisjoint(b.normal) and set(a.defect).isdisjoint(b.defect)
    assert sorted([*a.normal, *b.normal]) == list(range(9))
    assert sorted([*a.defect, *b.defect]) == list(range(12))
    again = cross_fit_halves(9, ["bad"] * 12, seed=3)[1]
    np.testing.assert_array_equal(again.normal, b.normal)
    np.testing.assert_array_equal(again.defect, b.defect)


def test_with_one_defect_kind_the_halves_are_the_shuffles_first_and_second_half() -> None:
    # What they were before kinds were known: a flat train/bad keeps its halves.
    rng = np.random.default_rng(5)
    rng.permutation(10)  # the normals' shuffle comes first
    defects = rng.permutation(7)
    a, b = cross_fit_halves(10, ["bad"] * 7, seed=5)
    np.testing.assert_array_equal(a.defect, np.sort(defects[:4]))
    np.testing.assert_array_equal(b.defect, np.sort(defects[4:]))


@pytest.mark.parametrize("seed", range(6))
def test_the_halves_split_every_defect_kind(seed: int) -> None:
    kinds = ["scratch"] * 4 + ["dent"] * 3 + ["spot"] * 5 + ["stain"] * 1 + ["crack"] * 3
    a, b = cross_fit_halves(8, kinds, seed)
    assert sorted([*a.defect, *b.defect]) == list(range(len(kinds)))
    assert len(a.defect) - len(b.defect) in (0, 1)
    for kind in set(kinds):
        rows = {i for i, k in enumerate(kinds) if k == kind}
        in_first = len(rows & set(a.defect))
        assert in_first in (len(rows) // 2, (len(rows) + 1) // 2), kind


def test_fine_candidate_is_stride_4_one_step_larger_with_a_smaller_coreset() -> None:
    config = fine(PatchCoreConfig(image_size=224, crop_from=256, coreset_ratio=0.1))
    assert config.layers == ("stage2", "stage3")
    assert (config.image_size, config.crop_from) == (256, 288)
    assert config.coreset_ratio == pytest.approx(0.0125)
    assert fine(PatchCoreConfig()).crop_from is None


def test_small_candidate_is_stride_8_alone_larger_with_mirrored_edges_and_the_same_bank() -> None:
    config = small(PatchCoreConfig(image_size=224, crop_from=256, coreset_ratio=0.1))
    assert config.layers == ("stage3",) and config.border == "reflect"
    assert (config.image_size, config.crop_from) == (384, 438)
    # As many bank patches per image as the base: (384 / 8)^2 * ratio == (224 / 8)^2 * 0.1.
    assert 48**2 * config.coreset_ratio == pytest.approx(28**2 * 0.1)
    assert small(PatchCoreConfig()).crop_from is None


def test_too_few_validation_images_is_a_clear_error() -> None:
    with pytest.raises(FitError, match="--auto needs at least 4"):
        cross_fit_halves(3, ["bad"] * 10, seed=0)


@pytest.fixture(scope="module")
def fits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, FitResult]:
    """Every candidate fitted, as fit_auto fits them."""
    root = tmp_path_factory.mktemp("auto")
    make_seed_layout(root, "tex", n_good=20, n_bad=8, n_test=2, size=64)
    bad = root / "tex" / "train" / "bad"
    for i, path in enumerate(sorted(bad.iterdir())):  # two kinds, in their own folders
        kind = bad / ("scratch" if i < 4 else "spot")
        kind.mkdir(exist_ok=True)
        path.rename(kind / path.name)
    records = discover(root)
    assert can_choose(records, 0.25, BASE.seed)
    return {
        name: fit_category(records, candidate(BASE), 0.25, device="cpu", progress=False)
        for name, candidate in CANDIDATES.items()
    }


@pytest.fixture(scope="module")
def chosen(fits: dict[str, FitResult]) -> AutoFit:
    return choose(fits, BASE.seed + 1)


def _halves(chosen: AutoFit) -> tuple[Rows, Rows]:
    parts = chosen.fit.parts
    return cross_fit_halves(len(parts["normal"]), chosen.fit.defect_kinds, BASE.seed + 1)


def _every(chosen: AutoFit) -> Rows:
    parts = chosen.fit.parts
    return Rows(np.arange(len(parts["normal"])), np.arange(len(parts["anomalous"])))


def _loo_figures(fits: dict[str, FitResult], key: str, rows: Rows) -> tuple[float, float]:
    """Leave-one-out AUROC and margin of candidate x scorer ``key`` on ``rows``, written out:
    each normal against every defect, both scored by the model calibrated on the *other*
    normals."""
    name, scorer = key.split()
    fit = fits[name]
    defects = fit.parts["anomalous"][rows.defect]
    pairs, normals, gaps = [], [], []
    for i, row in enumerate(rows.normal):
        model = calibrated(fit.model, scorer, fit.parts["normal"][np.delete(rows.normal, i)])
        normal = model.combine(*fit.parts["normal"][[row]].T)[0]
        scores = model.combine(*defects.T)
        pairs += [1.0 if d > normal else 0.5 if d == normal else 0.0 for d in scores]
        normals.append(normal)
        gaps += [d - normal for d in scores]
    return float(np.mean(pairs)), float(np.mean(gaps) / np.std(normals))


def _best(fits: dict[str, FitResult], rows: Rows) -> str:
    """The candidate x scorer --auto's rule picks on ``rows``: highest AUROC, then margin."""
    keys = [f"{name} {scorer}" for name in fits for scorer in SCORERS]
    figures = {key: _loo_figures(fits, key, rows) for key in keys}
    return max(keys, key=lambda k: (*figures[k], -keys.index(k)))


def test_each_half_holds_half_of_every_defect_kind(chosen: AutoFit) -> None:
    rows = chosen.fit.row_paths["anomalous"]
    assert chosen.fit.defect_kinds == tuple(path.parent.name for path in rows)
    for half in _halves(chosen):
        assert (
            sorted(chosen.fit.defect_kinds[i] for i in half.defect)
            == ["scratch"] * 2 + ["spot"] * 2
        )


def test_the_choice_is_made_on_every_validation_image_leave_one_out(
    fits: dict[str, FitResult], chosen: AutoFit
) -> None:
    auto, every = chosen.validation["auto"], _every(chosen)
    assert auto["n_selection"] == [len(every.normal), len(every.defect)]
    for key in ("default fused", "small patch"):
        auroc, margin = _loo_figures(fits, key, every)
        assert auto["selection_auroc"][key] == pytest.approx(auroc)
        assert auto["selection_margin"][key] == pytest.approx(margin)
    assert chosen.chosen == auto["chosen"] == _best(fits, every)
    assert chosen.fit is fits[chosen.chosen.split()[0]]
    assert chosen.model.config.scorer == auto["chosen"].split()[1]


def test_the_reported_figure_is_cross_fitted_on_the_two_halves(
    fits: dict[str, FitResult], chosen: AutoFit
) -> None:
    # Each fold: the choice made on one half alone, its model calibrated on that half's
    # normals, scored on the other half; the stored figure is the folds' mean.
    auto, (a, b) = chosen.validation["auto"], _halves(chosen)
    assert chosen.validation["n_normal"] == len(chosen.fit.parts["normal"])
    assert chosen.validation["n_anomalous"] == len(chosen.fit.parts["anomalous"])
    for fold, (choose_on, report_on) in zip(auto["folds"], [(a, b), (b, a)], strict=True):
        assert fold["chosen"] == _best(fits, choose_on)
        name, scorer = fold["chosen"].split()
        fit = fits[name]
        model = calibrated(fit.model, scorer, fit.parts["normal"][choose_on.normal])
        normal = model.combine(*fit.parts["normal"][report_on.normal].T)
        defect = model.combine(*fit.parts["anomalous"][report_on.defect].T)
        labels = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
        assert fold["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[normal, defect]))
        assert fold["n_report"] == [len(report_on.normal), len(report_on.defect)]
        kinds = np.array(fit.defect_kinds)[report_on.defect]
        for kind, auroc in fold["auroc_by_kind"].items():
            ours = defect[kinds == kind]
            labels = np.r_[np.zeros(len(normal)), np.ones(len(ours))]
            assert auroc == pytest.approx(roc_auc_score(labels, np.r_[normal, ours])), kind
    folds = auto["folds"]
    assert chosen.validation["auroc"] == pytest.approx(np.mean([f["auroc"] for f in folds]))
    assert set(auto["report_auroc_by_kind"]) == {"scratch", "spot"}
    for kind, auroc in auto["report_auroc_by_kind"].items():
        assert auroc == pytest.approx(np.mean([f["auroc_by_kind"][kind] for f in folds]))


def test_a_defect_kind_of_one_image_is_reported_by_the_fold_that_scored_it(
    fits: dict[str, FitResult],
) -> None:
    # Relabel one defect as a kind of its own: it lies in one half, so one fold reports it.
    def one_crack(fit: FitResult) -> FitResult:
        return dataclasses.replace(fit, defect_kinds=("crack", *fit.defect_kinds[1:]))

    chosen = choose({name: one_crack(fit) for name, fit in fits.items()}, BASE.seed + 1)
    folds = chosen.validation["auto"]["folds"]
    with_crack = [fold for fold in folds if "crack" in fold["auroc_by_kind"]]
    assert len(with_crack) == 1
    by_kind = chosen.validation["auto"]["report_auroc_by_kind"]
    assert by_kind["crack"] == with_crack[0]["auroc_by_kind"]["crack"]
    assert set(by_kind) == {"crack", "scratch", "spot"}


def test_the_stored_model_is_calibrated_on_every_held_out_normal(chosen: AutoFit) -> None:
    auto, parts = chosen.validation["auto"], chosen.fit.parts["normal"]
    np.testing.assert_allclose(chosen.model.part_calibration, parts)
    # Each normal's stored score is the one the model calibrated on the others gives it.
    scorer, rows = chosen.model.config.scorer, np.arange(len(parts))
    for i in (0, len(parts) - 1):
        normals = chosen.fit.parts["normal"][np.delete(rows, i)]
        left_out = calibrated(chosen.fit.model, scorer, normals).combine(*parts[[i]].T)
        assert chosen.model.calibration[i] == pytest.approx(left_out[0])
    # Every held-out normal chose the model: none may stand in for a run's normal images.
    assert "report_normal_scores" not in auto


def test_candidates_are_every_configuration_with_every_scorer(chosen: AutoFit) -> None:
    assert set(chosen.validation["auto"]["selection_auroc"]) == {
        "default fused", "default patch", "cosine fused", "cosine patch", "fine fused",
        "fine patch", "small fused", "small patch",
    }  # fmt: skip


def test_every_validation_image_is_stored_as_an_absolute_path(chosen: AutoFit) -> None:
    auto, rows = chosen.validation["auto"], chosen.fit.row_paths
    every = {str(path.absolute()) for path in [*rows["normal"], *rows["anomalous"]]}
    assert auto["selection_paths"] == sorted(every)
    assert len(every) == sum(auto["n_selection"])


def test_fit_command_takes_the_small_candidates_settings() -> None:
    # What docs/accuracy.md tells users to fit when tiny defects matter and --auto does not
    # choose `small`: the same configuration from the command line.
    from producer.cli import build_parser
    from producer.fit_command import config_from_args

    argv = "fit --layers stage3 --image-size 384 --border reflect --coreset-ratio 0.034"
    config = config_from_args(build_parser().parse_args(argv.split()))
    expected = small(PatchCoreConfig())
    assert (config.layers, config.image_size, config.border) == (
        expected.layers, expected.image_size, expected.border
    )  # fmt: skip
    assert config.coreset_ratio == pytest.approx(expected.coreset_ratio, rel=0.02)
    with pytest.raises(PatchqError, match="border must be one of"):
        config_from_args(build_parser().parse_args(["fit", "--border", "replicate"]))


def _printout(chosen: str, selection: dict[str, float], **auto: object) -> str:
    """What fit prints for a model --auto chose (the record fields given, figures made up)."""
    from producer.fitting import Fitted, describe_fit

    auto = {"report_auroc_by_kind": {"bad": 0.9}} | auto
    folds = [{"chosen": chosen}, {"chosen": "default fused"}]
    auto |= {"chosen": chosen, "selection_auroc": selection, "n_selection": [4, 9], "folds": folds}
    validation = {"auroc": 0.9, "average_precision": 0.9, "n_normal": 4, "n_anomalous": 9}
    fitted = Fitted(b"", validation | {"auto": auto}, 10, f"--auto: {chosen}", {})
    return describe_fit("tex", fitted, 1)


def test_fit_printout_says_when_a_tie_was_broken_by_margin() -> None:
    tied = _printout("fine patch", {"default patch": 1.0, "fine patch": 1.0})
    assert "a tie, broken by the larger margin" in tied
    assert "tie" not in _printout("fine patch", {"default patch": 0.9, "fine patch": 1.0})


def test_fit_printout_says_what_each_fold_chose() -> None:
    text = _printout("fine patch", {"fine patch": 1.0})
    assert "on every held-out image (4 normal, 9 defective" in text
    assert "both ways round (it chose fine patch and default fused)" in text


def test_fit_printout_lists_the_cross_fitted_figure_by_defect_kind_weakest_first() -> None:
    def printout(by_kind: dict[str, float]) -> str:
        return _printout("small fused", {"small fused": 0.9}, report_auroc_by_kind=by_kind)

    text = printout({"blur": 1.0, "scratch": 0.5, "spot": 0.875})
    assert "by defect kind, weakest first: scratch 0.500, spot 0.875, blur 1.000" in text
    assert "by defect kind" not in printout({"bad": 0.9})  # one kind: the figure above
