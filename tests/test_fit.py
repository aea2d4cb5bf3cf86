"""fit: the memory bank never judges itself; held-out figures separate real defects; bank
patches stream through a chunked coreset that leaves small fits as they were; progress shows."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from common.data.batches import decode_batch
from common.data.layouts import ImageRecord, discover
from common.engine import fit as fit_module
from common.engine import memory_bank
from common.engine.coreset import ApproximateGreedyCoresetSampler
from common.engine.features import PatchFeatureExtractor
from common.engine.fit import (
    AUDIT_MIN_IMAGES,
    FitError,
    audit_stride,
    fit_category,
    score_records,
    split_holdout,
)
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import extract_patches
from producer.fitting import Fitted, describe_fit
from synthetic.layouts import make_mvtec_layout, make_seed_layout

CONFIG = PatchCoreConfig(image_size=64, coreset_ratio=0.25)


def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(Path(f"{i}.png"), "c", "train", 0, "good") for i in range(n)]


def test_holdout_split_is_seeded_disjoint_and_keeps_both_sides() -> None:
    bank, held = split_holdout(_records(10), 0.2, seed=1)
    assert len(held) == 2 and len(bank) == 8
    assert not {r.path for r in bank} & {r.path for r in held}
    assert split_holdout(_records(10), 0.2, seed=1) == (bank, held)
    assert split_holdout(_records(10), 0.2, seed=2) != (bank, held)
    bank, held = split_holdout(_records(2), 0.01, seed=0)
    assert len(bank) == 1 and len(held) == 1


@pytest.fixture(scope="module")
def seed_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_seed_layout(root, "tex", n_good=20, n_bad=6, n_test=4, size=64)
    records = discover(root)
    return records, fit_category(records, CONFIG, holdout=0.25, device="cpu", progress=False)


def test_validation_never_scores_memory_bank_images(seed_fit) -> None:
    records, result = seed_fit
    assert result.bank_paths.isdisjoint(result.validation_paths)
    good = {r.path for r in records if r.split == "train" and r.label == 0}
    assert len(result.bank_paths) == 15 and result.bank_paths < good
    assert result.validation["n_normal"] == 5 and result.validation["n_anomalous"] == 6
    # The calibration distribution is the held-out normal scores: none is a bank image's ~0 s*.
    assert len(result.model.calibration) == 5
    assert result.model.part_calibration.shape == (5, 3)
    assert result.model.part_calibration[:, 0].min() > 0.05


def test_fused_calibration_scores_are_each_normal_left_out(seed_fit) -> None:
    # A held-out normal's stored score is what the model calibrated on the other normals gives
    # it: the score a new normal gets, not the lower one its own tails would give it.
    _, result = seed_fit
    model, parts = result.model, result.model.part_calibration
    assert model.config.scorer == "fused"
    for i in range(len(parts)):
        others = model.with_calibration(model.calibration, np.delete(parts, i, axis=0))
        assert model.calibration[i] == pytest.approx(others.combine(*parts[[i]].T)[0])
    assert not np.allclose(model.calibration, model.combine(*parts.T))  # not in-sample


def test_held_out_figures_separate_drawn_defects(seed_fit) -> None:
    _, result = seed_fit
    assert result.validation["auroc"] >= 0.9
    assert result.validation["normal_q95"] >= result.validation["normal_q50"]
    assert 0 < result.validation["bank_size"] <= 15 * 8 * 8


def test_a_fit_within_one_chunk_keeps_the_coreset_of_all_its_patches(seed_fit) -> None:
    records, result = seed_fit
    good = [r for r in records if r.split == "train" and r.label == 0]
    bank_records, _ = split_holdout(good, 0.25, CONFIG.seed)
    images = decode_batch([r.path for r in bank_records], CONFIG.preprocessing()).tensor
    patches = extract_patches(result.model.extractor, CONFIG, images)
    features = patches.reshape(-1, patches.shape[-1])
    picked = ApproximateGreedyCoresetSampler(CONFIG.coreset_ratio, seed=CONFIG.seed).sample(
        features
    )
    np.testing.assert_array_equal(result.model.bank.vectors, features[picked])


class _Bars:
    """Stands in for tqdm: records each bar's description, total and updates."""

    def __init__(self) -> None:
        self.made: list[dict] = []

    def __call__(self, total: int, desc: str, disable: bool, **_: object) -> _Bars:
        self.made.append({"desc": desc, "total": total, "done": 0, "shown": not disable})
        return self

    def update(self, n: int) -> None:
        self.made[-1]["done"] += n

    def close(self) -> None:
        pass


def test_a_fit_past_one_chunk_streams_its_patches_and_shows_its_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_seed_layout(tmp_path, "tex", n_good=20, n_bad=6, n_test=0, size=64)
    bars = _Bars()
    monkeypatch.setattr(fit_module, "tqdm", bars)
    monkeypatch.setattr(fit_module, "CHUNK_ROWS", 500)  # 15 bank images of 8 x 8 patches: 960
    seen: list[int] = []
    sample = ApproximateGreedyCoresetSampler.sample

    def spy(self: ApproximateGreedyCoresetSampler, features: np.ndarray) -> np.ndarray:
        seen.append(len(features))
        return sample(self, features)

    monkeypatch.setattr(ApproximateGreedyCoresetSampler, "sample", spy)
    result = fit_category(discover(tmp_path), CONFIG, 0.25, "cpu", batch_size=4, progress=True)
    assert seen == [512, 448]  # chunks of whole batches (4 images: 256 patches) from 500 on
    assert result.model.bank.size == 128 + 112
    assert result.validation["auroc"] >= 0.9
    assert result.timings["features_s"] > 0 and result.timings["coreset_s"] > 0
    assert [(b["desc"], b["total"], b["done"], b["shown"]) for b in bars.made] == [
        ("features", 15, 15, True),
        ("held-out normal", 5, 5, True),
        ("defects", 6, 6, True),
    ]


def test_an_approximate_bank_records_its_accuracy_cost_and_an_exact_one_does_not(
    tmp_path: Path, seed_fit
) -> None:
    assert "search" not in seed_fit[1].validation  # a small bank: exact flat search
    make_seed_layout(tmp_path, "tex", n_good=12, n_bad=4, n_test=0, size=64)
    ivf = dataclasses.replace(CONFIG, index="ivf", coreset_ratio=1.0)
    result = fit_category(discover(tmp_path), ivf, holdout=0.25, device="cpu", progress=False)
    search = result.validation["search"]
    assert search["index"] == "ivf" and result.model.bank.index_type == "ivf"
    assert 0.9 <= search["recall_at_1"] <= 1.0
    assert 0 <= search["max_image_score_change"] < 0.05
    assert abs(search["auroc_change"]) <= 0.1
    assert "ivf search against exact on them: recall@1" in describe_fit(
        "tex", Fitted(b"", result.validation, result.model.bank.size, "ivf", {}), 1
    )


@pytest.mark.parametrize(
    "candidate", [{"num_neighbors": 3}, {"top_share": 0.05, "position_radius": 1}]
)
def test_the_search_audit_runs_the_backbone_once_per_image_and_measures_the_exact_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, candidate: dict[str, Any]
) -> None:
    # Eq. 7 reweighting, top-share pooling and position-aware search run on the exact side
    # too: its s* is the one an exact model gives the same images, here scored again with a
    # flat copy of the bank.
    make_seed_layout(tmp_path, "tex", n_good=12, n_bad=4, n_test=0, size=64)
    config = dataclasses.replace(CONFIG, index="ivf", coreset_ratio=1.0, **candidate)
    images_seen = []
    forward = PatchFeatureExtractor.forward

    def counted(self: PatchFeatureExtractor, images: torch.Tensor) -> torch.Tensor:
        images_seen.append(len(images))
        return forward(self, images)

    monkeypatch.setattr(PatchFeatureExtractor, "forward", counted)
    monkeypatch.setattr(memory_bank, "default_nprobe", lambda nlist, size: 1)  # misses many
    result = fit_category(discover(tmp_path), config, holdout=0.25, device="cpu", progress=False)
    monkeypatch.undo()
    validation = result.validation
    assert sum(images_seen) == validation["bank_images"] + len(result.validation_paths)

    bank = result.model.bank
    exact = result.model.with_bank(MemoryBank(bank.vectors, "flat", positions=bank.positions))
    rows = [r for r in discover(tmp_path) if r.path in result.validation_paths]
    normal = [r for r in rows if r.label == 0]
    anomalous = [r for r in rows if r.label == 1]
    exact_parts = [score_records(exact, kind, 8, False, "")[0] for kind in (normal, anomalous)]
    truth = np.concatenate(exact_parts)[:, 0]
    found = np.r_[result.parts["normal"][:, 0], result.parts["anomalous"][:, 0]]
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    search = validation["search"]
    assert search["max_image_score_change"] == pytest.approx(
        (np.abs(found - truth) / truth).max(), rel=1e-4, abs=1e-7
    )
    assert search["auroc_change"] == pytest.approx(
        roc_auc_score(labels, found) - roc_auc_score(labels, truth), abs=1e-9
    )
    assert 0 < search["recall_at_1"] <= 1


def test_a_large_bank_audits_a_sample_of_the_validation_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The exact side of the audit costs images x bank patches: past the budget, every n-th
    # image is audited, across the normal and the defect pass alike.
    assert audit_stride(10_000, 300) == 1
    assert audit_stride(1_000_000, 300) == math.ceil(300 / AUDIT_MIN_IMAGES)
    make_seed_layout(tmp_path, "tex", n_good=12, n_bad=4, n_test=0, size=64)
    config = dataclasses.replace(CONFIG, index="ivf", coreset_ratio=1.0)
    monkeypatch.setattr(fit_module, "audit_stride", lambda bank, images: 3)
    result = fit_category(discover(tmp_path), config, holdout=0.25, device="cpu", progress=False)
    validated = len(result.validation_paths)
    assert result.validation["search"]["audited_images"] == math.ceil(validated / 3)
    assert 0 < result.validation["search"]["recall_at_1"] <= 1


def test_a_bank_auto_codes_is_saved_as_ivfpq_and_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory_bank, "AUTO_IVFPQ_MIN_SIZE", 100)  # every bank here is "large"
    make_seed_layout(tmp_path, "tex", n_good=12, n_bad=4, n_test=0, size=64)
    config = dataclasses.replace(CONFIG, coreset_ratio=1.0)
    result = fit_category(discover(tmp_path), config, holdout=0.25, device="cpu", progress=False)
    assert result.model.config.index == "ivfpq" and result.model.bank.index_type == "ivfpq"
    search = result.validation["search"]
    assert search["index"] == "ivfpq" and 0.9 <= search["recall_at_1"] <= 1
    assert search["max_image_score_change"] < 0.01


def test_mvtec_layout_uses_test_good_and_defect_folders(tmp_path: Path) -> None:
    make_mvtec_layout(tmp_path, "tex", n_train=10, n_test_good=3, n_per_defect=2)
    records = discover(tmp_path)
    result = fit_category(records, CONFIG, holdout=0.2, device="cpu", progress=False)
    n_defects = sum(r.label == 1 for r in records)
    assert result.validation["n_normal"] == 2 + 3
    assert result.validation["n_anomalous"] == n_defects


def test_unreadable_training_image_is_skipped_and_reported(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "tex", n_good=6, n_bad=2, n_test=0, size=64)
    broken = tmp_path / "tex" / "train" / "good" / "broken.png"
    broken.write_bytes(b"not an image")
    result = fit_category(discover(tmp_path), CONFIG, holdout=0.3, device="cpu", progress=False)
    assert broken in result.skipped
    assert result.validation["auroc"] is not None


def test_category_without_good_images_is_an_error() -> None:
    bad_only = [ImageRecord(Path("x.png"), "c", "train", 1, "bad")]
    with pytest.raises(FitError, match="no train/good"):
        fit_category(bad_only, CONFIG, device="cpu", progress=False)
