"""Tiling: large images scored as overlapping tiles against one bank, maps stitched back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.batches import decode_batch
from common.data.layouts import ImageRecord
from common.engine.anomaly_map import anomaly_map
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.engine.patchcore import build_extractor
from common.engine.tiling import tile_starts, tiled_features
from common.errors import PatchqError
from synthetic.layouts import save
from synthetic.textures import make_texture

SIZE = 128
CONFIG = PatchCoreConfig(
    image_size=SIZE, tile_size=64, tile_overlap=32, coreset_ratio=0.5, scorer="patch"
)


def test_tiles_cover_the_image_and_the_last_one_is_flush() -> None:
    assert tile_starts(128, 64, 32) == [0, 32, 64]
    assert tile_starts(384, 224, 32) == [0, 160]
    assert tile_starts(128, 128, 0) == [0]
    with pytest.raises(PatchqError, match="overlap"):
        tile_starts(128, 64, 64)


def test_tile_settings_are_checked_in_the_config() -> None:
    with pytest.raises(PatchqError, match="multiples of 32"):
        PatchCoreConfig(image_size=128, tile_size=48)
    with pytest.raises(PatchqError, match="tile size < image size"):
        PatchCoreConfig(image_size=128, tile_size=128)


def test_stitched_features_have_the_whole_image_grid() -> None:
    extractor = build_extractor(CONFIG, torch.device("cpu"))
    images = torch.randn(2, 3, SIZE, SIZE)
    stitched = tiled_features(extractor, images, 64, 32)
    assert stitched.shape == (2, SIZE // 8, SIZE // 8, 152)
    # Where only the first tile reaches, the stitched grid is that tile's features.
    corner = extractor(images[:, :, :64, :64])[:, :4, :4]
    torch.testing.assert_close(stitched[:, :4, :4], corner)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiles")
    train = [
        ImageRecord(save(make_texture(SIZE, i), root / f"{i}.png"), "tex", "train", 0)
        for i in range(8)
    ]
    return fit_category(train, CONFIG, holdout=0.25, device="cpu", progress=False).model


def test_defect_in_a_corner_tile_is_found_there(model, tmp_path: Path) -> None:
    image = make_texture(SIZE, 99)
    image[108:116, 110:118] = (230, 60, 40)  # an 8 px spot in the bottom-right tile only
    normal = save(make_texture(SIZE, 98), tmp_path / "normal.png")
    defective = save(image, tmp_path / "defect.png")
    batch = decode_batch([normal, defective], model.preprocessing).tensor
    result = model.score_tensors(batch)
    assert result.patch_maps.shape == (2, SIZE // 8, SIZE // 8)
    assert result.image_scores[1] > result.image_scores[0]
    full = anomaly_map(result.patch_maps[1], (SIZE, SIZE))
    assert full.shape == (SIZE, SIZE)
    y, x = np.unravel_index(full.argmax(), full.shape)
    assert y >= 96 and x >= 96
