"""Image files in, normalised tensors out: the one place where pixels enter patchq.

Every component (fit, workers, reports) loads images through `load_rgb` and `Preprocessing`, so a
model always sees pixels prepared exactly as the images its memory bank was built from.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.data.locations import Location, ObjectUri
from common.data.object_store import ObjectReadError, read_bytes
from common.errors import PatchqError

if TYPE_CHECKING:
    import torch

_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageLoadError(PatchqError):
    """An image that cannot be read; the message is "<path>: <reason>" so a run can record it."""

    def __init__(self, path: Location, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_rgb(path: Location) -> Image.Image:
    """Read an image fully and return it as 8-bit RGB, upright as its EXIF orientation says.

    The whole file is decoded here (`load()`), so a truncated or corrupt file fails now with an
    `ImageLoadError` naming the reason, instead of later inside a batch. An object store that
    does not answer raises `ObjectStoreUnavailable` instead: that is no fault of the image.
    """
    try:
        with open_image(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"too large to decode safely ({exc})") from None
    except PermissionError:
        raise ImageLoadError(path, "permission denied") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(path, f"corrupt or truncated image ({exc})") from None
    try:
        return _to_rgb(upright)
    except ValueError:
        raise ImageLoadError(path, f"unsupported colour mode {upright.mode!r}") from None


def open_image(path: Location) -> Image.Image:
    """The image at `path` opened (lazily, as `Image.open` does), local file or object.

    An object's bytes are fetched whole into memory (common.data.object_store), never to disk.
    """
    if isinstance(path, ObjectUri):
        try:
            data = read_bytes(path)
        except ObjectReadError as error:
            raise ImageLoadError(path, error.reason) from None
        if not data:
            raise ImageLoadError(path, "empty object (0 bytes)")
        return Image.open(io.BytesIO(data))
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(path, "is a folder, not a file" if path.is_dir() else "file not found")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return Image.open(path)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparent images are composited on black rather than having alpha dropped: the colour
    stored under fully transparent pixels is arbitrary (editors leave whatever was there), so
    dropping alpha would let invisible junk reach the model; a fixed background makes two images
    that look the same give the same pixels.
    """
    if image.mode in _HIGH_DEPTH_MODES:
        return Image.fromarray(_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale 16-bit / 32-bit / float pixels to 0..255 by the range their type can hold.

    A fixed range, not each image's own min..max: stretching every image to full contrast would
    make a uniformly dark (defective) cell look like a normal one. Pillow decodes 16-bit files to
    'I;16' or 'I', so 'I' values within 0..65535 are taken as 16-bit; floats within 0..1 as unit
    range. Only values outside those ranges fall back to the image's own min..max.
    """
    is_float = values.dtype.kind == "f"
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if is_float and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    elif not is_float and low >= 0 and high <= 65535:
        low, high = 0.0, 65535.0
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the backbone's input tensor; stored in the model artifact.

    The default resizes the whole image, because a centre crop discards the border, where real
    defects sit. `crop_from` keeps the seed's recipe (resize the shorter side to `crop_from`,
    centre-crop `image_size`). `mean`/`std` must match the backbone's training: 0.5/0.5 for the
    TF-converted EfficientNet-Lite weights, ImageNet statistics for WideResNet-50.
    """

    image_size: int = 224
    crop_from: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if not _is_int(self.image_size) or self.image_size < 8:
            raise PatchqError(
                f"preprocessing image_size must be an integer >= 8, got {self.image_size!r}"
            )
        if self.crop_from is not None and (
            not _is_int(self.crop_from) or self.crop_from < self.image_size
        ):
            raise PatchqError(
                f"preprocessing crop_from must be empty or an integer >= image_size "
                f"({self.image_size}), got {self.crop_from!r}"
            )
        for name, lowest in (("mean", -math.inf), ("std", 0.0)):
            values = getattr(self, name)
            if not (isinstance(values, tuple) and len(values) == 3 and all(map(_is_real, values))):
                raise PatchqError(f"preprocessing {name} must be 3 finite numbers, got {values!r}")
            if any(v <= lowest for v in values):
                raise PatchqError(f"preprocessing {name} values must be > {lowest}, got {values!r}")

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """float32 tensor (3, image_size, image_size), normalised; `image` must be RGB.

        torch is imported here, not with the module: `Preprocessing` is also what aggregation
        reads from a stored model, and aggregation must not import torch (issue 12)."""
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as tf

        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image (use load_rgb), got mode {image.mode!r}")
        pixels = tf.pil_to_tensor(image).to(torch.float32).div_(255.0)
        size = [self.image_size, self.image_size]
        if self.crop_from is None:
            pixels = tf.resize(pixels, size, InterpolationMode.BILINEAR, antialias=True)
        else:
            pixels = tf.resize(pixels, [self.crop_from], InterpolationMode.BILINEAR, antialias=True)
            pixels = tf.center_crop(pixels, size)
        return tf.normalize(pixels, list(self.mean), list(self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values for the artifact (no pickling)."""
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Strict inverse of `to_dict`: every field required, no unknown ones.

        Strict because a silently defaulted mean/std would score with the wrong normalisation.
        """
        fields = {"image_size", "crop_from", "mean", "std"}
        if not isinstance(data, Mapping) or set(data) != fields:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise PatchqError(
                f"preprocessing record must have exactly {sorted(fields)}, got {keys}"
            )
        vectors = {}
        for name in ("mean", "std"):
            if not isinstance(data[name], list | tuple):
                raise PatchqError(f"preprocessing {name} must be a list of 3 numbers")
            vectors[name] = tuple(data[name])
        return cls(image_size=data["image_size"], crop_from=data["crop_from"], **vectors)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
