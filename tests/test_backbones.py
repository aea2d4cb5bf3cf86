"""Backbones: real ImageNet weights from disk, the right stages, clear errors, no fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from common.engine.backbones import (
    TF_LITE_MEAN,
    TF_LITE_STD,
    BackboneError,
    build_classifier,
    load_backbone,
    trunk_of,
)

EGYPTIAN_CAT, TABBY, TIGER_CAT, ESPRESSO = 285, 281, 282, 967


def _tf_lite_input(image: np.ndarray) -> torch.Tensor:
    resized = np.array(Image.fromarray(image).resize((224, 224), Image.BILINEAR), np.float32)
    x = torch.from_numpy(resized).permute(2, 0, 1)
    mean = torch.tensor(TF_LITE_MEAN)[:, None, None] * 255
    std = torch.tensor(TF_LITE_STD)[:, None, None] * 255
    return ((x - mean) / std)[None]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_default_weights_are_real_imagenet_weights(name: str) -> None:
    net = build_classifier(name)
    with torch.inference_mode():
        cat = net(_tf_lite_input(data.chelsea())).argmax().item()
        coffee = net(_tf_lite_input(data.coffee())).argmax().item()
    assert cat in {EGYPTIAN_CAT, TABBY, TIGER_CAT}
    assert coffee == ESPRESSO


@pytest.mark.parametrize(
    ("name", "weights", "channels"),
    [
        ("efficientnet_lite0", None, (40, 112)),
        ("efficientnet_lite1", None, (40, 112)),
        ("efficientnet_lite2", None, (48, 120)),
        ("wide_resnet50_2", "random", (512, 1024)),
    ],
)
def test_default_layers_give_stride_8_and_16_maps(
    name: str, weights: str | None, channels: tuple[int, int]
) -> None:
    backbone = load_backbone(name, weights=weights)
    with torch.inference_mode():
        maps = backbone(torch.zeros(2, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [
        (2, channels[0], 28, 28),
        (2, channels[1], 14, 14),
    ]


def test_backbone_stops_after_deepest_requested_stage() -> None:
    backbone = load_backbone("efficientnet_lite0", layers=("stage2", "stage3"))
    assert backbone.stage_names == ["stage1", "stage2", "stage3"]


def test_unknown_backbone_and_layer_are_clear_errors() -> None:
    with pytest.raises(BackboneError, match="choose one of"):
        load_backbone("resnet9000")
    with pytest.raises(BackboneError, match="this backbone has"):
        load_backbone("efficientnet_lite0", layers=("layer2",))


def test_wide_resnet_without_weights_offline_says_how_to_provide_them(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(BackboneError, match="--weights FILE"):
        load_backbone("wide_resnet50_2")


def test_wide_resnet_loads_a_given_weight_file(tmp_path) -> None:
    reference = build_classifier("wide_resnet50_2", weights="random")
    path = tmp_path / "wrn.pth"
    torch.save(reference.state_dict(), path)
    loaded = build_classifier("wide_resnet50_2", weights=path)
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)


def test_unreadable_weight_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot be read"):
        load_backbone("efficientnet_lite0", weights=path)


def test_folded_batch_norms_compute_the_same_features() -> None:
    # load_backbone folds each batch norm into its convolution; the classifier keeps them.
    layers = ("stage3", "stage5")
    unfolded = trunk_of("efficientnet_lite0", build_classifier("efficientnet_lite0"), layers)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in unfolded.modules())
    folded = load_backbone("efficientnet_lite0", layers)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = _tf_lite_input(data.chelsea())
    with torch.no_grad():
        for want, got in zip(unfolded(x), folded(x), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
