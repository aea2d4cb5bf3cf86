"""Writes old_model.npz and old_model_scores.json: a model and its scores from patchq before
the distance, position_radius and top_share options (main at 1a67d39), so that
tests/test_candidates.py can check that such a file still reads and scores the same.

Run from the repository root of that commit: python -m tests.data.make_old_model
(float32 and a projection to 32 dims keep the file small and the scores machine-independent
to float rounding).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from common.data.batches import decode_batch
from common.data.layouts import discover
from common.engine.artifact import save_artifact
from common.engine.fit import fit_category
from common.engine.patchcore import PatchCoreConfig
from tests.synthetic import make_seed_layout

HERE = Path(__file__).parent
CONFIG = PatchCoreConfig(image_size=64, projection_dim=32, coreset_ratio=0.25, precision="float32")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_seed_layout(root, "tex", n_good=10, n_bad=2, n_test=4, size=64)
        records = discover(root)
        model = fit_category(records, CONFIG, holdout=0.2, device="cpu", progress=False).model
        paths = sorted(r.path for r in records if r.split == "test")
        result = model.score_tensors(decode_batch(paths, model.preprocessing).tensor)
        (HERE / "old_model.npz").write_bytes(save_artifact(model, "tex"))
        scores = {
            "image_scores": result.image_scores.tolist(),
            "patch_scores": result.patch_scores.tolist(),
            "patch_maps": result.patch_maps.tolist(),
        }
        (HERE / "old_model_scores.json").write_text(json.dumps(scores))


if __name__ == "__main__":
    main()
