"""`fit --auto` without labelled defects: synthesised defects, the alignment share, the choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.images import load_rgb
from common.data.layouts import ImageRecord, discover
from common.engine.defect_synthesis import (
    FAMILY,
    GLOBAL_KINDS,
    KINDS,
    LOCAL_KINDS,
    synthesise,
    synthesise_set,
)
from common.engine.fit import FitError, fit_category, split_holdout
from common.engine.label_free import (
    ALIGNED_SHARE,
    MIN_NORMALS,
    can_choose_label_free,
    choice_sample,
    fit_label_free,
    positional_share,
)
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import build_extractor
from common.settings import Settings
from producer.fitting import FitPlan, Fitted, describe_fit, fit_model
from synthetic.layouts import save
from synthetic.textures import make_grain, make_texture

BASE = PatchCoreConfig(image_size=64, coreset_ratio=0.25)
N_GOOD = 40  # 8 held out at the default 20%: just enough for the label-free default


def make_aligned(size: int, seed: int) -> np.ndarray:
    """A part photographed in place: a bright bar and a dark bar at fixed positions (as a solar
    cell's busbars), under noise and a per-image brightness, like cells of different current."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 120.0) + rng.normal(0, 8, (size, size))
    image[size // 4 : size // 4 + 6, :] += 90
    image[:, size // 2 : size // 2 + 5] -= 80
    image *= rng.uniform(0.8, 1.2)
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def write_category(root: Path, category: str, make, n_good: int = N_GOOD) -> list[ImageRecord]:
    for i in range(n_good):
        save(make(64, i), root / category / "train" / "good" / f"{i:03d}.png")
    return discover(root, [category])


@pytest.fixture(scope="module")
def texture(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    return write_category(tmp_path_factory.mktemp("texture"), "tex", make_grain)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> list[ImageRecord]:
    return write_category(tmp_path_factory.mktemp("aligned"), "cells", make_aligned)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_changes_a_copy_locally_or_everywhere_and_is_seeded(kind: str) -> None:
    image, donor = make_texture(96, 1), make_texture(96, 2)
    before = image.copy()
    made = synthesise(image, donor, kind, np.random.default_rng(0))
    np.testing.assert_array_equal(image, before)  # the normal itself is never touched
    assert made.shape == image.shape and made.dtype == np.uint8
    changed = (np.abs(made.astype(int) - image).max(axis=2) > 2).mean()
    if kind in LOCAL_KINDS:
        assert 0 < changed < 0.15, changed
    else:
        assert changed > 0.3, changed
    again = synthesise(image, donor, kind, np.random.default_rng(0))
    np.testing.assert_array_equal(made, again)


def test_kinds_are_local_or_whole_image_and_unknown_ones_are_refused() -> None:
    assert set(FAMILY) == set(KINDS) == set(LOCAL_KINDS) | set(GLOBAL_KINDS)
    with pytest.raises(ValueError, match="synthesised defect kind"):
        synthesise(make_texture(32, 0), make_texture(32, 1), "dent", np.random.default_rng(0))


def test_a_set_makes_a_fixed_number_of_copies_per_kind_from_the_normals_in_turn() -> None:
    images = [make_texture(48, seed) for seed in range(3)]
    made, kinds, sources = synthesise_set(images, ["spot", "blur"], per_kind=4, seed=4)
    assert len(made) == len(kinds) == len(sources) == 2 * 4
    assert kinds.count("spot") == kinds.count("blur") == 4
    assert sources == [0, 1, 2, 0] * 2
    with pytest.raises(ValueError, match="at least 2 normal images"):
        synthesise_set(images[:1], ["spot"], per_kind=1, seed=0)


def test_the_alignment_share_tells_parts_in_place_from_a_texture(texture, aligned) -> None:
    extractor = build_extractor(BASE, torch.device("cpu"))

    def share(records: list[ImageRecord]) -> float:
        images = [np.asarray(load_rgb(r.path)) for r in records]
        return positional_share(extractor, BASE, images, batch_size=16)

    texture_share, aligned_share = share(texture), share(aligned)
    assert texture_share < ALIGNED_SHARE < aligned_share, (texture_share, aligned_share)


def test_the_label_free_default_needs_enough_held_out_normals(texture) -> None:
    assert can_choose_label_free(texture, 0.2, 0)
    few = texture[: MIN_NORMALS * 5 - 5]  # 35 good images: 7 held out
    assert not can_choose_label_free(few, 0.2, 0)


def test_a_forced_choice_without_enough_normals_is_one_clear_error(texture) -> None:
    with pytest.raises(FitError, match="at least 2 readable held-out normals, got 1"):
        fit_label_free(texture[:5], BASE, 0.2, device="cpu", progress=False)


@pytest.fixture(scope="module")
def texture_choice(texture):
    return fit_label_free(texture, BASE, 0.2, device="cpu", batch_size=16, progress=False)


def test_a_texture_chooses_between_the_base_and_fine_on_synthesised_defects(
    texture, texture_choice
) -> None:
    record = texture_choice.validation["auto"]
    assert record["chosen_on"] == "synthesised" and not record["aligned"]
    assert set(record["synthesised_auroc"]) == {"default", "fine"}
    for figures in record["synthesised_auroc"].values():
        assert set(figures) == set(KINDS) | {"local", "whole-image"}
        assert all(0 <= a <= 1 for a in figures.values())
    gain = (
        record["synthesised_auroc"]["fine"]["local"]
        - record["synthesised_auroc"]["default"]["local"]
    )
    expected = "fine" if gain >= 0.02 else "default"
    assert texture_choice.chosen == f"{expected} fused"
    # No labelled defect, so no validation figure: synthesised ones are never reported as one.
    assert texture_choice.validation["auroc"] is None
    assert texture_choice.validation["n_anomalous"] == 0
    held_out = split_holdout([r for r in texture if r.label == 0], 0.2, BASE.seed)[1]
    assert record["selection_paths"] == sorted(str(r.path.absolute()) for r in held_out)
    assert record["compared_on_good_images"] == N_GOOD  # no more than CHOICE_IMAGES: all


def test_a_sample_keeps_every_other_record_in_order_and_is_seeded(texture) -> None:
    other = ImageRecord(Path("bad.png"), "tex", "train", 1, "scratch")
    records = [*texture, other]
    sample = choice_sample(records, 10, seed=3)
    assert sum(r.label == 0 for r in sample) == 10 and sample[-1] is other
    assert sample == sorted(sample, key=records.index)  # the records' order
    assert sample == choice_sample(records, 10, seed=3) != choice_sample(records, 10, seed=4)
    assert choice_sample(records, len(texture), seed=3) is records


def test_a_large_texture_is_compared_on_a_sample_and_only_the_chosen_one_fitted_on_all(
    texture,
) -> None:
    chosen = fit_label_free(
        texture, BASE, 0.2, device="cpu", batch_size=16, progress=False, choice_images=20
    )
    record = chosen.validation["auto"]
    assert record["compared_on_good_images"] == 20
    sample = choice_sample(texture, 20, BASE.seed)
    held_out = split_holdout([r for r in sample if r.label == 0], 0.2, BASE.seed)[1]
    # The synthesised copies were judged against the sample's held-out normals ...
    assert record["selection_paths"] == sorted(str(r.path.absolute()) for r in held_out)
    # ... and the model kept is the chosen candidate fitted on every good image.
    config = BASE if chosen.chosen.startswith("default") else chosen.model.config
    plain = fit_category(texture, config, device="cpu", progress=False)
    np.testing.assert_array_equal(chosen.model.bank.vectors, plain.model.bank.vectors)
    assert chosen.validation["n_normal"] == plain.validation["n_normal"] == 8
    fitted = Fitted(b"", chosen.validation, chosen.model.bank.size, chosen.chosen, {})
    assert "ranked (on fits of 20 of the 40 good images):" in describe_fit("tex", fitted, 1)


def test_nothing_synthesised_enters_the_bank_or_the_calibration(texture, texture_choice) -> None:
    name = texture_choice.chosen.split()[0]
    config = BASE if name == "default" else texture_choice.model.config
    plain = fit_category(texture, config, device="cpu", progress=False)
    np.testing.assert_array_equal(texture_choice.model.bank.vectors, plain.model.bank.vectors)
    np.testing.assert_allclose(texture_choice.model.calibration, plain.model.calibration)
    np.testing.assert_allclose(texture_choice.model.part_calibration, plain.model.part_calibration)


def test_an_aligned_category_gets_cosine_neighbours(aligned) -> None:
    chosen = fit_label_free(aligned, BASE, 0.2, device="cpu", batch_size=16, progress=False)
    record = chosen.validation["auto"]
    assert record["aligned"] and record["positional_share"] >= ALIGNED_SHARE
    assert chosen.chosen == "cosine patch"
    assert chosen.model.config.distance == "cosine" and chosen.model.config.scorer == "patch"
    assert set(record["synthesised_auroc"]) == {"cosine"}  # one candidate: no other to fit


def test_fit_chooses_without_labels_by_default_and_not_with_no_auto(texture, capsys) -> None:
    settings = Settings.load({"device": "cpu", "batch_size": 16})
    fitted = fit_model(texture, FitPlan(BASE), settings)
    assert fitted.validation["auto"]["chosen_on"] == "synthesised"
    assert fitted.summary.endswith("no labelled defects")
    text = describe_fit("tex", fitted, 7)
    assert "without labelled defects" in text and "not a validation" in text
    assert "on fits of" not in text  # 40 good images: the candidates saw all of them
    plain = fit_model(texture, FitPlan(BASE, auto=False), settings)
    assert "auto" not in plain.validation and plain.summary == "fused scorer"
