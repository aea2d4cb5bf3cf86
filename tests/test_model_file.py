"""Aggregation's torch-free reading of a stored model agrees with the engine's full reading."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from common.data.layouts import discover
from common.engine.artifact import ArtifactError, read_artifact, save_artifact
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.engine.model_file import held_out_patch_maxima, read_model_reference
from synthetic.layouts import make_seed_layout


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("data")
    make_seed_layout(root, "cell", n_good=12, n_bad=2, n_test=1)
    config = PatchCoreConfig(image_size=64, coreset_ratio=0.25, num_neighbors=2)
    result = fit_category(discover(root), config, holdout=0.25, device="cpu", progress=False)
    return save_artifact(result.model, "cell")


def test_reference_matches_the_engines_reading_of_every_version(artifact: bytes) -> None:
    with np.load(io.BytesIO(artifact)) as archive:
        arrays = {name: archive[name] for name in archive.files}
    header = json.loads(arrays.pop("header").tobytes())
    old = json.loads(json.dumps(header))
    for key in ("fusion", "border", "precision"):  # fields newer than versions 1-3
        old["config"].pop(key)
    version_1 = old | {
        "version": 1,
        "config": {k: v for k, v in old["config"].items() if k != "scorer"},
    }
    files = [
        artifact,
        _archive(old | {"version": 3}, arrays),
        _archive(version_1, {n: arrays[n] for n in ("bank", "calibration")}),
    ]
    for data in files:
        full, light = read_artifact(data), read_model_reference(data)
        config = full.config
        assert (light.scorer, light.fusion, light.num_neighbors) == (
            config.scorer,
            config.fusion,
            config.num_neighbors,
        )
        assert light.preprocessing == config.preprocessing()
        np.testing.assert_array_equal(light.calibration, full.calibration)
        expected = held_out_patch_maxima(full.part_calibration, full.calibration, config.scorer)
        np.testing.assert_array_equal(light.normal_patch_maxima, expected)
        assert not light.ensemble


def test_damaged_files_are_the_engines_errors() -> None:
    with pytest.raises(ArtifactError, match="corrupt"):
        read_model_reference(b"garbage bytes")


def _archive(header: dict, arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
    return buffer.getvalue()
