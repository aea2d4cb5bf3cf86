"""load_rgb turns every supported kind of file into upright 8-bit RGB and every bad file into an
ImageLoadError with its reason; Preprocessing makes the tensors and survives the artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.files import is_image_file
from common.data.images import ImageLoadError, Preprocessing, load_rgb
from common.errors import PatchqError
from synthetic.layouts import save
from synthetic.textures import make_texture


def test_extension_match_is_case_insensitive() -> None:
    assert is_image_file(Path("a/B.PNG")) and is_image_file(Path("c.JpEg"))
    assert not is_image_file(Path("notes.txt")) and not is_image_file(Path("png"))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high; left half red
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: display after turning 90 degrees clockwise
    image.save(tmp_path / "rotated.png", exif=exif)
    upright = np.asarray(load_rgb(tmp_path / "rotated.png"))
    assert upright.shape == (40, 20, 3)
    assert (upright[:20, :, 0] == 255).all() and (upright[20:, :, 0] == 0).all()


@pytest.mark.parametrize(
    ("array", "suffix", "expected"),
    [
        (np.array([[0, 257 * 100, 65535]], np.uint16), ".png", [0, 100, 255]),  # I;16
        (np.array([[0, 257 * 100, 65535]], np.int32), ".tif", [0, 100, 255]),  # I
        (np.array([[0.0, 0.5, 1.0]], np.float32), ".tif", [0, 128, 255]),  # F, unit range
        (np.array([[0, 128, 255]], np.uint8), ".png", [0, 128, 255]),  # L
    ],
)
def test_high_depth_and_grayscale_become_8_bit_rgb(
    tmp_path: Path, array: np.ndarray, suffix: str, expected: list[int]
) -> None:
    path = tmp_path / f"image{suffix}"
    Image.fromarray(array).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert np.asarray(image)[0, :, 0].tolist() == expected
    assert (np.asarray(image) == np.asarray(image)[..., :1]).all()  # gray stays gray


def test_16_bit_is_scaled_by_type_range_not_stretched(tmp_path: Path) -> None:
    dark = np.full((4, 4), 257 * 10, np.uint16)  # a uniformly dark image must stay dark
    Image.fromarray(dark).save(tmp_path / "dark.png")
    assert (np.asarray(load_rgb(tmp_path / "dark.png")) == 10).all()


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    pixels = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    Image.fromarray(pixels, "RGBA").save(tmp_path / "alpha.png")
    image = np.asarray(load_rgb(tmp_path / "alpha.png"))
    assert image[0, 0].tolist() == [200, 100, 50]
    assert image[0, 1].tolist() == [0, 0, 0]
    assert np.abs(image[0, 2].astype(int) - [100, 50, 25]).max() <= 1


def test_palette_image_becomes_rgb(tmp_path: Path) -> None:
    Image.fromarray(make_texture(16, 0)).convert("P").save(tmp_path / "p.png")
    assert load_rgb(tmp_path / "p.png").mode == "RGB"


def _written(folder: Path, name: str, data: bytes) -> Path:
    (folder / name).write_bytes(data)
    return folder / name


def _truncated(tmp_path: Path, suffix: str) -> Path:
    path = save(make_texture(64, 1), tmp_path / f"whole{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda d: d / "missing.png", "file not found"),
        (lambda d: d, "is a folder"),
        (lambda d: _written(d, "empty.png", b""), "empty file"),
        (lambda d: _written(d, "text.png", b"hello"), "not an image"),
        (lambda d: _truncated(d, ".png"), "corrupt or truncated"),
        (lambda d: _truncated(d, ".jpg"), "corrupt or truncated"),
    ],
    ids=["missing", "folder", "zero-byte", "text-as-png", "truncated-png", "truncated-jpeg"],
)
def test_bad_files_raise_image_load_error_with_reason(tmp_path: Path, make, reason: str) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageLoadError) as caught:
        load_rgb(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert reason in caught.value.reason
    assert isinstance(caught.value, PatchqError)


def test_to_tensor_resizes_whole_image_and_normalises() -> None:
    image = Image.new("RGB", (90, 60), (255, 0, 128))
    tensor = Preprocessing(image_size=32).to_tensor(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-5)


def test_crop_option_keeps_centre_only() -> None:
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:4] = 255  # a bright border row that the centre crop must drop
    tensor = Preprocessing(image_size=32, crop_from=48, mean=(0, 0, 0), std=(1, 1, 1)).to_tensor(
        Image.fromarray(pixels)
    )
    assert tensor.shape == (3, 32, 32) and float(tensor.max()) == 0.0
    whole = Preprocessing(image_size=32, mean=(0, 0, 0), std=(1, 1, 1)).to_tensor(
        Image.fromarray(pixels)
    )
    assert float(whole[:, 0].min()) > 0.9  # without cropping, the border survives


def test_dict_round_trip() -> None:
    prep = Preprocessing(image_size=64, crop_from=72, mean=(0.485, 0.456, 0.406), std=(1, 2, 3))
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    assert Preprocessing.from_dict(Preprocessing().to_dict()) == Preprocessing()


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 0},
        {"image_size": "224"},
        {"image_size": True},
        {"crop_from": 100},  # smaller than image_size
        {"mean": [0.5, 0.5]},
        {"std": [0.5, 0.0, 0.5]},
        {"std": [0.5, float("nan"), 0.5]},
        {"mean": "0.5"},
        {"extra": 1},
    ],
)
def test_from_dict_rejects_bad_values(changes: dict) -> None:
    with pytest.raises(PatchqError):
        Preprocessing.from_dict({**Preprocessing().to_dict(), **changes})


def test_from_dict_requires_every_field() -> None:
    record = Preprocessing().to_dict()
    del record["std"]
    with pytest.raises(PatchqError, match="exactly"):
        Preprocessing.from_dict(record)
