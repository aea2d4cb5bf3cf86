"""Locally aware patch features (PatchCore, Roth et al. 2022, section 3.1).

Every feature map position becomes one patch vector phi_ij: each chosen layer is averaged over
its 3x3 neighbourhood (the paper's patch size p=3, so a patch sees a little context without
losing resolution), deeper layers are resized bilinearly to the grid of the shallowest layer,
and the layers are concatenated. Optionally the concatenated vector is reduced to a fixed
dimension by adaptive average pooling over channels, as the reference implementation does;
it needs no fitted parameters, so the artifact stays just the memory bank.

Borders (issue 13): the 3x3 average at the image edge sees only 4-6 real neighbours. With
``border="zeros"`` (the paper's reference implementation: a zero-padded unfold, torch's default
``count_include_pad=True``) the missing neighbours count as zeros, so border patches shrink
towards the origin, are compared with the bank's equally shrunk border patches and stay quiet.
``border="mean"`` (models saved before artifact version 4) averages only the real neighbours:
border patches are then averages of fewer values, noisier than interior ones, and on fine
textures they took the image maximum (bench/accuracy.py: small-spot AUROC 0.79 with zeros vs
0.56). ``border="reflect"`` mirrors REFLECT_PAD pixels of the image outward on every side before
the backbone and cuts the patch grid back to the image afterwards: a patch at the edge then sees
real (mirrored) neighbours through every convolution, not zeros, and a defect within a few
pixels of the edge is not averaged away. On bench/accuracy.py's stripes (half of the tiny
defects lie within 2 px of the edge) it raised tiny-defect s* from 0.55-0.68 to 0.74-0.83 at
224 px and from 0.80-0.88 to 0.94-0.97 at 384 px (stage 3 alone), for 17-30% more backbone work
(the padded input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.engine.backbones import FeatureBackbone
from common.errors import PatchqError

BORDERS = ("zeros", "mean", "reflect")
# Pixels mirrored on each side with border="reflect": a multiple of every stride up to 16 (the
# patch grid is cut back by whole cells) whose double keeps the input a multiple of 32.
REFLECT_PAD = 16


class PatchFeatureExtractor(nn.Module):
    """Backbone + local aggregation + grid alignment: images (B,3,S,S) -> patches (B,h,w,D)."""

    def __init__(
        self,
        backbone: FeatureBackbone,
        patch_size: int = 3,
        projection_dim: int | None = None,
        bfloat16: bool = False,
        border: str = "zeros",
    ):
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise PatchqError(f"patch size must be an odd positive number, got {patch_size}")
        if projection_dim is not None and projection_dim < 1:
            raise PatchqError(f"projection dimension must be positive, got {projection_dim}")
        if border not in BORDERS:
            raise PatchqError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
        self.backbone = backbone
        self.border = border
        self.patch_size = patch_size
        self.projection_dim = projection_dim
        self.bfloat16 = bfloat16

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.border != "reflect":
            return self._patches(images)
        padded = F.pad(images, (REFLECT_PAD,) * 4, mode="reflect")
        patches = self._patches(padded)
        cells = patches.shape[1] * REFLECT_PAD // padded.shape[-1]  # the padding, in grid cells
        cut = patches[:, cells : patches.shape[1] - cells, cells : patches.shape[2] - cells]
        return cut.contiguous()

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        # bfloat16 convolutions (autocast) run 2-3x faster where the hardware has them; the
        # aggregation after them stays float32.
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.bfloat16):
            raw = self.backbone(images)
        maps = [self._aggregate_locally(m.float()) for m in raw]
        grid = maps[0].shape[-2:]
        aligned = [maps[0]] + [
            F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps[1:]
        ]
        patches = torch.cat(aligned, dim=1).permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.projection_dim is not None:
            b, h, w, d = patches.shape
            flat = F.adaptive_avg_pool1d(patches.reshape(b * h * w, 1, d), self.projection_dim)
            patches = flat.reshape(b, h, w, self.projection_dim)
        return patches.contiguous()

    def _aggregate_locally(self, feature_map: torch.Tensor) -> torch.Tensor:
        pad = self.patch_size // 2
        return F.avg_pool2d(
            feature_map,
            self.patch_size,
            stride=1,
            padding=pad,
            count_include_pad=self.border != "mean",
        )
