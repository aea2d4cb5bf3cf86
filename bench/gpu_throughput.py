"""Images/s of one worker's scorer on one device, decode included: the body of bench/gpu_check.sh.

    .venv/bin/python -m bench.gpu_throughput [--device cuda] [--backbones efficientnet_lite0
        efficientnet_lite2] [--images 3000] [--image-size 224] [--batch-size 64]

For each backbone: fit on 30 synthetic textures (coreset 0.1, bfloat16 on the device), store the
model in a temporary SQLite database, register the test images as a run and score them with
the pipelined scorer a `patchq worker` runs (common.pipelined: claim, decode in threads,
backbone and search on the device, write in the background; pinned memory on CUDA). The broker
is left out: it carries only image ids. On CUDA the memory bank is searched by faiss-gpu when
installed, else by the exact torch search on the GPU (common.engine.memory_bank). Prints
images/s and the time split per backbone.

`--device cpu --images 16 --image-size 64` runs the same logic on a CPU in seconds; a test does
that, so the script's CPU-side logic cannot rot while no GPU is at hand.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.in_process import score_overlapping
from bench.worker_bench import fit_and_store
from common.engine.model_config import PatchCoreConfig
from common.scoring.model_cache import ModelProvider
from common.scoring.stages import TIMING_KEYS
from common.settings import Settings
from common.store.connection import open_database
from producer.submission import register_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--backbones", nargs="+", default=["efficientnet_lite0", "efficientnet_lite2"]
    )
    parser.add_argument("--images", type=int, default=3000, help="test images per backbone")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pipeline-depth", type=int, default=3)
    args = parser.parse_args(argv)
    rows = []
    for backbone in args.backbones:
        with tempfile.TemporaryDirectory(prefix="patchq-gpu-") as tmp:
            rows.append((backbone, *measure(Path(tmp), backbone, args)))
    print(
        f"\n{args.images} images of {args.image_size} px per backbone, batches of "
        f"{args.batch_size}, pipeline depth {args.pipeline_depth}, device {args.device}, "
        f"{os.cpu_count()} CPU cores"
    )
    header = f"{'backbone':<20}{'images/s':>9}" + "".join(f"{k:>12}" for k in TIMING_KEYS)
    print(header + "\n" + "-" * len(header))
    for backbone, images_per_s, split in rows:
        print(
            f"{backbone:<20}{images_per_s:>9.1f}"
            + "".join(f"{split[k]:>12.3f}" for k in TIMING_KEYS)
        )


def measure(tmp: Path, backbone: str, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """(images/s, time split) of scoring `args.images` images with `backbone`."""
    settings = Settings.load(
        {
            "database_url": f"sqlite:///{tmp / 'gpu.db'}",
            "device": args.device,
            "batch_size": args.batch_size,
            "pipeline_depth": args.pipeline_depth,
            "model_cache_dir": tmp / "models",
        }
    )
    config = PatchCoreConfig(
        backbone=backbone, image_size=args.image_size, coreset_ratio=0.1, precision="bfloat16"
    )
    with open_database(settings.database_url) as (_, sessions):
        _, records = fit_and_store(tmp / "data", sessions, config, args.images, args.device)
        provider = ModelProvider(sessions, settings.model_cache_dir, settings.device)
        warm = register_run(sessions, records[: args.batch_size], "warm-up", "gpu", args.batch_size)
        score_overlapping(sessions, warm.run_id, settings, provider)  # model load, kernels
        run = register_run(sessions, records, "gpu", "gpu", args.batch_size)
        start = time.perf_counter()
        split = score_overlapping(sessions, run.run_id, settings, provider)
        wall = time.perf_counter() - start
    return len(records) / wall, split


if __name__ == "__main__":
    main()
