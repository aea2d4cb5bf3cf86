"""`fit --auto`: chosen on a selection half, reported on a report half it never saw."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.data.layouts import discover
from common.engine.auto import (
    AutoFit,
    NestedSplit,
    calibrated,
    can_choose,
    fine,
    fit_auto,
    nested_split,
    small,
)
from common.engine.fit import FitError
from common.engine.patchcore import PatchCoreConfig
from common.errors import PatchqError
from tests.synthetic import make_seed_layout

BASE = PatchCoreConfig(image_size=64, coreset_ratio=0.25)


def test_nested_split_halves_are_disjoint_seeded_and_complete() -> None:
    split = nested_split(9, ["bad"] * 12, seed=3)
    assert set(split.normal_selection).isdisjoint(split.normal_report)
    assert set(split.defect_selection).isdisjoint(split.defect_report)
    assert sorted([*split.normal_selection, *split.normal_report]) == list(range(9))
    assert sorted([*split.defect_selection, *split.defect_report]) == list(range(12))
    again = nested_split(9, ["bad"] * 12, seed=3)
    np.testing.assert_array_equal(again.normal_report, split.normal_report)
    np.testing.assert_array_equal(again.defect_report, split.defect_report)


def test_with_one_defect_kind_the_halves_are_the_shuffles_first_and_second_half() -> None:
    # What they were before kinds were known: a flat train/bad keeps its --auto choice.
    rng = np.random.default_rng(5)
    rng.permutation(10)  # the normals' shuffle comes first
    defects = rng.permutation(7)
    split = nested_split(10, ["bad"] * 7, seed=5)
    np.testing.assert_array_equal(split.defect_selection, np.sort(defects[:4]))
    np.testing.assert_array_equal(split.defect_report, np.sort(defects[4:]))


@pytest.mark.parametrize("seed", range(6))
def test_nested_split_halves_every_defect_kind(seed: int) -> None:
    kinds = ["scratch"] * 4 + ["dent"] * 3 + ["spot"] * 5 + ["stain"] * 1 + ["crack"] * 3
    split = nested_split(8, kinds, seed)
    assert sorted([*split.defect_selection, *split.defect_report]) == list(range(len(kinds)))
    assert len(split.defect_selection) - len(split.defect_report) in (0, 1)
    for kind in set(kinds):
        rows = {i for i, k in enumerate(kinds) if k == kind}
        in_selection = len(rows & set(split.defect_selection))
        assert in_selection in (len(rows) // 2, (len(rows) + 1) // 2), kind


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
        nested_split(3, ["bad"] * 10, seed=0)


@pytest.fixture(scope="module")
def chosen(tmp_path_factory: pytest.TempPathFactory) -> AutoFit:
    root = tmp_path_factory.mktemp("auto")
    make_seed_layout(root, "tex", n_good=20, n_bad=8, n_test=2, size=64)
    bad = root / "tex" / "train" / "bad"
    for i, path in enumerate(sorted(bad.iterdir())):  # two kinds, in their own folders
        kind = bad / ("scratch" if i < 4 else "spot")
        kind.mkdir(exist_ok=True)
        path.rename(kind / path.name)
    records = discover(root)
    assert can_choose(records, 0.25, BASE.seed)
    return fit_auto(records, BASE, holdout=0.25, device="cpu", progress=False)


def _split(chosen: AutoFit) -> NestedSplit:
    parts = chosen.fit.parts
    return nested_split(len(parts["normal"]), chosen.fit.defect_kinds, BASE.seed + 1)


def test_each_half_holds_half_of_every_defect_kind(chosen: AutoFit) -> None:
    rows, split = chosen.fit.row_paths["anomalous"], _split(chosen)
    assert chosen.fit.defect_kinds == tuple(path.parent.name for path in rows)
    for half in (split.defect_selection, split.defect_report):
        assert sorted(chosen.fit.defect_kinds[i] for i in half) == ["scratch"] * 2 + ["spot"] * 2


def test_reported_figures_come_from_the_report_half_only(chosen: AutoFit) -> None:
    auto, split = chosen.validation["auto"], _split(chosen)
    assert auto["n_report"] == [len(split.normal_report), len(split.defect_report)]
    assert chosen.validation["n_normal"] == len(split.normal_report)
    assert chosen.validation["n_anomalous"] == len(split.defect_report)
    # Recompute the reported AUROC from the report rows alone, scored by the model calibrated
    # on the selection normals (the one that was chosen): it must match exactly.
    model = calibrated(chosen.fit, chosen.model.config.scorer, split.normal_selection)
    normal = model.combine(*chosen.fit.parts["normal"][split.normal_report].T)
    defect = model.combine(*chosen.fit.parts["anomalous"][split.defect_report].T)
    labels = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
    assert chosen.validation["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[normal, defect]))
    kinds = np.array(chosen.fit.defect_kinds)[split.defect_report]
    by_kind = auto["report_auroc_by_kind"]
    assert set(by_kind) == {"scratch", "spot"}
    for kind, auroc in by_kind.items():
        ours = defect[kinds == kind]
        labels = np.r_[np.zeros(len(normal)), np.ones(len(ours))]
        assert auroc == pytest.approx(roc_auc_score(labels, np.r_[normal, ours])), kind


def test_the_stored_model_is_calibrated_on_every_held_out_normal(chosen: AutoFit) -> None:
    auto, split, parts = chosen.validation["auto"], _split(chosen), chosen.fit.parts["normal"]
    figures = {
        key: (auroc, auto["selection_margin"][key])
        for key, auroc in auto["selection_auroc"].items()
    }
    assert auto["chosen"] == max(figures, key=figures.get)  # ties on AUROC go by margin
    assert chosen.model.config.scorer == auto["chosen"].split()[1]
    np.testing.assert_allclose(chosen.model.part_calibration, parts)
    # Each normal's stored score is the one the model calibrated on the others gives it.
    scorer, rows = chosen.model.config.scorer, np.arange(len(parts))
    for i in (0, len(parts) - 1):
        left_out = calibrated(chosen.fit, scorer, np.delete(rows, i)).combine(*parts[[i]].T)
        assert chosen.model.calibration[i] == pytest.approx(left_out[0])
    # What aggregate may use as normal images: the report half's, not the selection's.
    np.testing.assert_allclose(
        auto["report_normal_scores"], chosen.model.calibration[split.normal_report]
    )


def test_candidates_are_every_configuration_with_every_scorer(chosen: AutoFit) -> None:
    assert set(chosen.validation["auto"]["selection_auroc"]) == {
        "default fused", "default patch", "fine fused", "fine patch", "small fused", "small patch"
    }  # fmt: skip


def test_the_selection_half_is_stored_as_absolute_paths(chosen: AutoFit) -> None:
    auto, rows = chosen.validation["auto"], chosen.fit.row_paths
    split = _split(chosen)
    selection = {str(rows["normal"][i].absolute()) for i in split.normal_selection}
    selection |= {str(rows["anomalous"][i].absolute()) for i in split.defect_selection}
    report = {str(rows["normal"][i].absolute()) for i in split.normal_report}
    report |= {str(rows["anomalous"][i].absolute()) for i in split.defect_report}
    assert set(auto["selection_paths"]) == selection
    assert selection.isdisjoint(report) and len(selection) == sum(auto["n_selection"])


def test_selection_auroc_is_leave_one_out_pairwise(chosen: AutoFit) -> None:
    # Each selection normal is compared with every selection defect, both scored by the model
    # calibrated on the other selection normals (the fused scorer: s* ignores calibration).
    fit, split = chosen.fit, _split(chosen)
    rows, key = split.normal_selection, f"{chosen.chosen.split()[0]} fused"
    defects = fit.parts["anomalous"][split.defect_selection]
    pairs, normals, gaps = [], [], []
    for i, row in enumerate(rows):
        model = calibrated(fit, "fused", np.delete(rows, i))
        normal = model.combine(*fit.parts["normal"][[row]].T)[0]
        scores = model.combine(*defects.T)
        pairs += [1.0 if d > normal else 0.5 if d == normal else 0.0 for d in scores]
        normals.append(normal)
        gaps += [d - normal for d in scores]
    auto = chosen.validation["auto"]
    assert auto["selection_auroc"][key] == pytest.approx(np.mean(pairs))
    # The tie-break: the mean gap in units of the left-out normals' spread.
    assert auto["selection_margin"][key] == pytest.approx(np.mean(gaps) / np.std(normals))


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

    auto |= {"chosen": chosen, "selection_auroc": selection, "n_selection": [4, 9]}
    validation = {"auroc": 0.9, "average_precision": 0.9, "n_normal": 4, "n_anomalous": 9}
    fitted = Fitted(b"", validation | {"auto": auto}, 10, f"--auto: {chosen}", {})
    return describe_fit("tex", fitted, 1)


def test_fit_printout_says_when_a_tie_was_broken_by_margin() -> None:
    tied = _printout("fine patch", {"default patch": 1.0, "fine patch": 1.0})
    assert "a tie, broken by the larger margin" in tied
    assert "tie" not in _printout("fine patch", {"default patch": 0.9, "fine patch": 1.0})


def test_fit_printout_lists_the_report_half_by_defect_kind_weakest_first() -> None:
    def printout(by_kind: dict[str, float]) -> str:
        return _printout("small fused", {"small fused": 0.9}, report_auroc_by_kind=by_kind)

    text = printout({"blur": 1.0, "scratch": 0.5, "spot": 0.875})
    assert "by defect kind, weakest first: scratch 0.500, spot 0.875, blur 1.000" in text
    assert "by defect kind" not in printout({"bad": 0.9})  # one kind: the figure above
