"""Decode image files into one normalised batch tensor, keeping per-file failures.

Decoding runs in a thread pool: PIL releases the GIL while decoding and resizing, so the
backbone is not left waiting on one core. Objects in a bucket or on a web server are fetched by
more threads than there are cores (PATCHQ_FETCH_CONCURRENCY), because a GET mostly waits on the
network; common.data.object_store caps the GETs in flight per process. A file that cannot be
read is reported with its reason instead of failing the batch, so one bad image never costs the
others their scores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from common.data.images import ImageLoadError, Preprocessing, load_rgb
from common.data.locations import Location, ObjectUri
from common.data.object_store import fetch_concurrency


@dataclass(frozen=True)
class DecodedBatch:
    """``tensor`` holds the images that decoded, in the order of ``ok`` (indices into the input)."""

    tensor: torch.Tensor
    ok: list[int]
    sizes: list[tuple[int, int]]  # (height, width) of each decoded original
    failures: dict[int, str]  # input index -> reason


def _decode(path: Location, preprocessing: Preprocessing) -> tuple[torch.Tensor, tuple[int, int]]:
    image = load_rgb(path)
    return preprocessing.to_tensor(image), (image.height, image.width)


def decode_batch(
    paths: Sequence[Location], preprocessing: Preprocessing, workers: int = 4
) -> DecodedBatch:
    """Decode ``paths``; unreadable ones land in ``failures`` with the reason.

    `workers` threads decode; with objects among the paths, at least as many as GETs may be in
    flight, so the network's latency overlaps instead of adding up.
    """
    tensors: list[torch.Tensor] = []
    ok: list[int] = []
    sizes: list[tuple[int, int]] = []
    failures: dict[int, str] = {}
    if any(isinstance(p, ObjectUri) for p in paths):
        workers = max(workers, fetch_concurrency())
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        futures = [pool.submit(_decode, p, preprocessing) for p in paths]
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
    paths: Sequence[Location], preprocessing: Preprocessing, batch_size: int
) -> Iterator[tuple[Sequence[Location], DecodedBatch]]:
    """Yield ``(chunk of paths, decoded chunk)`` of at most ``batch_size`` images."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        yield chunk, decode_batch(chunk, preprocessing)
