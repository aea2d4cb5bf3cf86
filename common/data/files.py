"""Which files are images, by name alone: kept apart from image decoding so that finding and
registering millions of paths never imports torch or PIL."""

from __future__ import annotations

from pathlib import Path

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)


def is_image_file(path: Path) -> bool:
    """Extension test, case-insensitive because cameras and Windows tools write `.JPG`/`.PNG`."""
    return path.suffix.lower() in IMAGE_EXTENSIONS
