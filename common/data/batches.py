"""Decode image files into one normalised batch tensor, keeping per-file failures.

Decoding runs in a thread pool: PIL releases the GIL while decoding and resizing, so the
backbone is not left waiting on one core. A file that cannot be read is reported with its
reason instead of failing the batch, so one bad image never costs the others their scores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from common.data.images import ImageLoadError, Preprocessing, load_rgb


@dataclass(frozen=True)
class DecodedBatch:
    """``tensor`` holds the images that decoded, in the order of ``ok`` (indices into the input)."""

    tensor: torch.Tensor
    ok: list[int]
    sizes: list[tuple[int, int]]  # (height, width) of each decoded original
    failures: dict[int, str]  # input index -> reason


def _decode(path: Path, preprocessing: Preprocessing) -> tuple[torch.Tensor, tuple[int, int]]:
    image = load_rgb(path)
    return preprocessing.to_tensor(image), (image.height, image.width)


def decode_batch(
    paths: Sequence[Path], preprocessing: Preprocessing, workers: int = 4
) -> DecodedBatch:
    """Decode ``paths``; unreadable ones land in ``failures`` with the reason."""
    tensors: list[torch.Tensor] = []
    ok: list[int] = []
    sizes: list[tuple[int, int]] = []
    failures: dict[int, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = [pool.submit(_decode, Path(p), preprocessing) for p in paths]
        for i, future in enumerate(futures):
            try:
                tensor, size = future.result()
            except ImageLoadError as exc:
                failures[i] = str(exc)
                continue
            tensors.append(tensor)
            ok.append(i)
            sizes.append(size)
    size = preprocessing.image_size
    stacked = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)
    return DecodedBatch(stacked, ok, sizes, failures)


def iter_batches(
    paths: Sequence[Path], preprocessing: Preprocessing, batch_size: int
) -> Iterator[tuple[Sequence[Path], DecodedBatch]]:
    """Yield ``(chunk of paths, decoded chunk)`` of at most ``batch_size`` images."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield chunk, decode_batch(chunk, preprocessing)
