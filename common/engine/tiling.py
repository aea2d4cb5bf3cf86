"""Score large images as overlapping tiles against one memory bank, stitched back together.

Resizing a large image down to the backbone's input size shrinks a few-pixel defect below one
feature cell. With tiling the image is resized to ``image_size`` (large), cut into square tiles
of ``tile_size`` that overlap by ``tile_overlap`` pixels, and every tile goes through the
backbone at its native resolution. The tiles' patch feature grids are stitched into one grid
for the whole image, averaging where tiles overlap (so a patch near a tile edge, whose
receptive field is padded, is blended with the neighbouring tile's view of the same place).
Scoring and fitting then see ordinary (B, H, W, D) features: bank, patch map, image score and
the global statistics work unchanged, and fit builds its bank from the same tiles.

Tiles start on multiples of 32 pixels (sizes and overlap are multiples of 32), so each tile's
feature grid lands exactly on the full image's grid at any backbone stride up to 32.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import PatchqError


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets along one axis: step ``tile - overlap``, the last tile flush with the edge."""
    if not 0 <= overlap < tile <= size:
        raise PatchqError(
            f"tiles must satisfy 0 <= overlap ({overlap}) < tile size ({tile}) <= image size "
            f"({size})"
        )
    starts = list(range(0, size - tile + 1, tile - overlap))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def tiled_features(
    extractor: nn.Module, images: torch.Tensor, tile: int, overlap: int
) -> torch.Tensor:
    """Patch features (B, H, W, D) of ``images`` (B, 3, S, S) extracted tile by tile.

    Each tile position runs as one backbone batch of B tiles, so memory stays that of an
    untiled batch of tile-sized images.
    """
    size = images.shape[-1]
    starts = tile_starts(size, tile, overlap)
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    stride = 1
    for y in starts:
        for x in starts:
            features = extractor(images[:, :, y : y + tile, x : x + tile])
            h, w = features.shape[1:3]
            if total is None:
                stride = tile // h
                grid = size // stride
                total = features.new_zeros(features.shape[0], grid, grid, features.shape[-1])
                count = features.new_zeros(1, grid, grid, 1)
            rows, cols = slice(y // stride, y // stride + h), slice(x // stride, x // stride + w)
            total[:, rows, cols] += features
            count[:, rows, cols] += 1  # type: ignore[index]
    assert total is not None and count is not None
    return total / count
