"""PatchCore scoring, anomaly maps and the model artifact, on tiny synthetic textures."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from common.engine import memory_bank
from common.engine.anomaly_map import anomaly_map
from common.engine.artifact import ArtifactError, load_artifact, read_artifact, save_artifact
from common.engine.features import PatchFeatureExtractor
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import PatchCore, build_extractor
from common.errors import PatchqError
from synthetic.textures import draw_defect, make_texture

SIZE = 96


@pytest.fixture(scope="module")
def model() -> PatchCore:
    """A model whose bank holds every patch of 6 normal textures (ratio 1: exact bank)."""
    config = PatchCoreConfig(image_size=SIZE, coreset_ratio=1.0, scorer="patch")
    extractor = build_extractor(config, torch.device("cpu"))
    batch = _batch(config, [make_texture(SIZE, seed) for seed in range(6)])
    patches = extractor(batch).numpy()
    bank = MemoryBank(patches.reshape(-1, patches.shape[-1]))
    return PatchCore(config, extractor, bank, calibration=np.array([1.0, 2.0], np.float32))


def _batch(config: PatchCoreConfig, images: list[np.ndarray]) -> torch.Tensor:
    from PIL import Image

    prep = config.preprocessing()
    return torch.stack([prep.to_tensor(Image.fromarray(i)) for i in images])


def test_feature_grid_is_stride_8(model: PatchCore) -> None:
    patches = model.extractor(torch.zeros(1, 3, SIZE, SIZE))
    assert patches.shape == (1, SIZE // 8, SIZE // 8, 40 + 112)


def test_projection_reduces_patch_dimension() -> None:
    config = PatchCoreConfig(image_size=64, projection_dim=64)
    patches = build_extractor(config, torch.device("cpu"))(torch.zeros(1, 3, 64, 64))
    assert patches.shape[-1] == 64


def test_bank_images_score_zero_and_defects_score_high(model: PatchCore) -> None:
    normal = make_texture(SIZE, 0)  # in the bank
    unseen = make_texture(SIZE, 50)
    defective, _ = draw_defect(make_texture(SIZE, 51), "spot", seed=3)
    result = model.score_tensors(_batch(model.config, [normal, unseen, defective]))
    assert result.image_scores[0] == pytest.approx(0.0, abs=1e-2)
    assert result.image_scores[2] > result.image_scores[1] > result.image_scores[0]
    assert result.patch_maps.shape == (3, SIZE // 8, SIZE // 8)
    assert result.image_scores == pytest.approx(result.patch_maps.reshape(3, -1).max(axis=1))
    assert result.embeddings.shape == (3, 152)


def test_reweighting_scales_the_max_distance_down(model: PatchCore) -> None:
    config = PatchCoreConfig(image_size=SIZE, coreset_ratio=1.0, num_neighbors=3, scorer="patch")
    reweighted = PatchCore(config, model.extractor, model.bank, model.calibration)
    defective, _ = draw_defect(make_texture(SIZE, 51), "spot", seed=3)
    batch = _batch(config, [defective])
    plain = model.score_tensors(batch).image_scores[0]
    weighted = reweighted.score_tensors(batch).image_scores[0]
    assert 0 < weighted < plain


def test_anomaly_map_is_smooth_bilinear_not_blocky() -> None:
    grid = np.zeros((4, 4), np.float32)
    grid[1, 1] = 1.0
    full = anomaly_map(grid, (64, 64))
    assert full.shape == (64, 64)
    peak = np.unravel_index(full.argmax(), full.shape)
    assert 16 <= peak[0] < 32 and 16 <= peak[1] < 32
    raw = anomaly_map(grid, (64, 64), sigma=0)
    # Nearest-neighbour upsampling would leave a flat 16x16 tile; bilinear varies inside it.
    assert len(np.unique(raw[16:32, 24])) > 4
    assert full.max() < raw.max()  # the Gaussian spreads the peak


@pytest.mark.parametrize("index", ["hnsw", "ivf", "ivfpq", "torch"])
def test_each_index_scores_within_tolerance_of_the_exact_search(
    model: PatchCore, index: str
) -> None:
    defective, _ = draw_defect(make_texture(SIZE, 61), "spot", seed=4)
    batch = _batch(model.config, [make_texture(SIZE, 60), defective])
    exact = model.with_bank(MemoryBank(model.bank.vectors, "flat")).score_tensors(batch)
    found = model.with_bank(MemoryBank(model.bank.vectors, index)).score_tensors(batch)
    np.testing.assert_allclose(found.image_scores, exact.image_scores, rtol=0.01)
    assert np.isclose(found.patch_maps, exact.patch_maps, rtol=1e-5).mean() >= 0.95


def test_a_model_saved_with_auto_before_ivfpq_loads_its_large_bank_as_ivf(
    model: PatchCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory_bank, "AUTO_IVFPQ_MIN_SIZE", model.bank.size)  # now "large"
    assert model.config.index == "auto"
    assert load_artifact(save_artifact(model, "tex"), device="cpu").bank.index_type == "ivf"
    config = dataclasses.replace(model.config, index="ivfpq")  # what fit saves now
    named = PatchCore(config, model.extractor, model.bank, model.calibration)
    assert load_artifact(save_artifact(named, "tex"), device="cpu").bank.index_type == "ivfpq"


def test_artifact_round_trip_scores_identically(model: PatchCore) -> None:
    data = save_artifact(model, "tex", {"auroc": 0.9})
    loaded = load_artifact(data, device="cpu")
    batch = _batch(model.config, [make_texture(SIZE, 77)])
    assert loaded.config == model.config
    np.testing.assert_array_equal(loaded.calibration, model.calibration)
    np.testing.assert_allclose(
        loaded.score_tensors(batch).image_scores, model.score_tensors(batch).image_scores
    )
    assert read_artifact(data).validation == {"auroc": 0.9}


def test_corrupt_artifact_is_a_clear_error() -> None:
    with pytest.raises(ArtifactError, match="corrupt"):
        read_artifact(b"garbage bytes")


def _rewrite_header(data: bytes, **changes: object) -> bytes:
    with np.load(io.BytesIO(data)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays["header"].tobytes()) | changes
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def test_artifact_of_another_version_or_shape_is_refused(model: PatchCore) -> None:
    data = save_artifact(model, "tex")
    with pytest.raises(ArtifactError, match="version 99"):
        read_artifact(_rewrite_header(data, version=99))
    with pytest.raises(ArtifactError, match="inconsistent"):
        read_artifact(_rewrite_header(data, feature_dim=7))
    other_backbone = _rewrite_header(
        data, config=model.config.to_dict() | {"layers": ["stage2", "stage3"]}
    )
    with pytest.raises(ArtifactError, match="does not match its backbone"):
        load_artifact(other_backbone, device="cpu")


def test_artifact_holds_no_pickled_objects(model: PatchCore) -> None:
    data = save_artifact(model, "tex")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert sorted(archive.namelist()) == ["bank.npy", "calibration.npy", "header.npy"]
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:  # raises on object arrays
        assert all(archive[name].dtype != object for name in archive.files)


def test_device_auto_falls_back_to_cpu_and_missing_cuda_is_an_error(monkeypatch) -> None:
    from common.engine.patchcore import resolve_device
    from common.errors import PatchqError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(PatchqError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_bfloat16_backbone_gives_nearly_the_float32_features() -> None:
    images = _batch(PatchCoreConfig(image_size=64), [make_texture(64, 5)])
    by_precision = {
        precision: build_extractor(
            PatchCoreConfig(image_size=64, precision=precision), torch.device("cpu")
        )(images)
        for precision in ("float32", "bfloat16")
    }
    reference = by_precision["float32"]
    error = (by_precision["bfloat16"] - reference).norm() / reference.norm()
    assert by_precision["bfloat16"].dtype == torch.float32
    assert 0 < error < 0.05


def test_models_saved_before_the_precision_setting_load_as_float32() -> None:
    saved = PatchCoreConfig().to_dict()
    del saved["precision"]
    assert PatchCoreConfig.from_dict(saved).precision == "float32"
    with pytest.raises(PatchqError, match="precision must be one of"):
        PatchCoreConfig(precision="float8")


class _ConstantBackbone(torch.nn.Module):
    """One feature map of ones: what the local average does at the border is all that varies."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [torch.ones(images.shape[0], 2, 6, 6)]


def test_zero_padded_border_counts_missing_neighbours_as_zeros() -> None:
    images = torch.zeros(1, 3, 48, 48)
    zeros = PatchFeatureExtractor(_ConstantBackbone(), border="zeros")(images)[0, ..., 0]  # type: ignore[arg-type]
    mean = PatchFeatureExtractor(_ConstantBackbone(), border="mean")(images)[0, ..., 0]  # type: ignore[arg-type]
    assert torch.all(mean == 1)
    # The paper's zero-padded unfold: a corner patch sees 4 of 9, an edge patch 6 of 9.
    assert zeros[0, 0] == pytest.approx(4 / 9) and zeros[0, 3] == pytest.approx(6 / 9)
    assert torch.all(zeros[1:-1, 1:-1] == 1)


class _Stride8Ones(torch.nn.Module):
    """A stride-8 map of ones over whatever input it gets, padded or not."""

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = images.shape[-1] // 8
        return [torch.ones(images.shape[0], 2, size, size)]


def test_reflect_border_keeps_the_grid_and_gives_edge_patches_real_neighbours() -> None:
    images = torch.rand(1, 3, 48, 48)
    patches = PatchFeatureExtractor(_Stride8Ones(), border="reflect")(images)  # type: ignore[arg-type]
    assert patches.shape == (1, 6, 6, 2)  # the unpadded image's grid, padding cut away
    assert torch.all(patches == 1)  # no zero neighbours shrink the edge patches


def test_reflect_border_needs_a_layer_fine_enough_to_cut_the_padding_away() -> None:
    assert PatchCoreConfig(layers=("stage3",), border="reflect").border == "reflect"
    with pytest.raises(PatchqError, match="border 'reflect' needs a layer of stride 16"):
        PatchCoreConfig(layers=("stage6",), border="reflect")


def test_version_3_artifacts_keep_their_border_and_fusion(model: PatchCore) -> None:
    assert model.config.border == "zeros" and model.config.fusion == "min-p"
    data = save_artifact(model, "tex")
    with np.load(io.BytesIO(data)) as archive:
        config = json.loads(archive["header"].tobytes())["config"]
    for key in ("border", "fusion"):
        config.pop(key)
    old = _rewrite_header(data, version=3, config=config)
    assert read_artifact(old).config.border == "mean"
    assert read_artifact(old).config.fusion == "max"
    loaded = load_artifact(old, device="cpu")
    assert loaded.extractor.border == "mean"
    batch = _batch(model.config, [make_texture(SIZE, 99)])
    # The stored setting is applied: the border patches, and so the maps, differ.
    assert not np.allclose(
        loaded.score_tensors(batch).patch_maps, model.score_tensors(batch).patch_maps
    )


def test_unknown_border_is_a_clear_error() -> None:
    with pytest.raises(PatchqError, match="border must be one of"):
        PatchCoreConfig(border="replicate")
