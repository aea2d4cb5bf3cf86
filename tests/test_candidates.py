"""Issue 23's model candidates: cosine distance, position-aware neighbours and top-share pooling,
each checked against a reference computed by hand, through the artifact, `fit --update`, an
ensemble and a real worker; and an older model file reading and scoring exactly as it did."""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from common.data.batches import decode_batch
from common.data.layouts import discover
from common.engine.artifact import ArtifactError, load_artifact, read_artifact, save_artifact
from common.engine.bank_update import update_features, update_model
from common.engine.ensemble import fit_ensemble, load_ensemble, save_ensemble
from common.engine.fit import fit_category
from common.engine.memory_bank import MemoryBank
from common.engine.model_config import PatchCoreConfig
from common.engine.model_file import read_model_reference
from common.engine.patchcore import PatchCore, extract_patches, pool_patch_distances
from common.engine.position_search import grid_positions
from common.errors import PatchqError
from synthetic.layouts import make_seed_layout, save
from synthetic.textures import draw_variant, make_texture
from tests.cluster import CONFIG, ClusterFactory, Data, assert_scored_exactly_once

OLD_MODEL = Path(__file__).parent / "data" / "old_model.npz"
OLD_SCORES = Path(__file__).parent / "data" / "old_model_scores.json"
BASE = PatchCoreConfig(image_size=64, coreset_ratio=0.25, precision="float32")
FitModel = Callable[..., PatchCore]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_seed_layout(root, "tex", n_good=10, n_bad=2, n_test=4, size=64)
    return root


@pytest.fixture(scope="module")
def fit_with(root: Path) -> FitModel:
    """fit_with(**options): BASE with the options, fitted once per module on the layout."""
    fitted: dict[str, PatchCore] = {}

    def fit(**options: object) -> PatchCore:
        key = json.dumps(options, sort_keys=True)
        if key not in fitted:
            config = dataclasses.replace(BASE, **options)  # type: ignore[arg-type]
            records = discover(root)
            fitted[key] = fit_category(records, config, 0.2, "cpu", progress=False).model
        return fitted[key]

    return fit


def _test_batch(root: Path, preprocessing: object) -> torch.Tensor:
    paths = sorted((root / "tex" / "test").iterdir())
    return decode_batch(paths, preprocessing).tensor  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distance": "dot"}, "distance must be one of l2, cosine, got 'dot'"),
        ({"position_radius": -1}, "position radius must be a whole number .* got -1"),
        ({"position_radius": 1.5}, "position radius must be a whole number .* got 1.5"),
        ({"top_share": 0.0}, r"top share must be in \(0, 1\], got 0.0"),
        ({"top_share": 1.5}, r"top share must be in \(0, 1\], got 1.5"),
        ({"top_share": 0.01, "num_neighbors": 3}, "num_neighbors 3 reweights the largest one"),
    ],
)
def test_bad_candidate_settings_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(PatchqError, match=message) as error:
        PatchCoreConfig(**options)
    assert "\n" not in str(error.value)


def test_configs_without_the_fields_read_as_l2_anywhere_max() -> None:
    old = PatchCoreConfig().to_dict()
    for field in ("distance", "position_radius", "top_share"):
        old.pop(field)
    config = PatchCoreConfig.from_dict(old)
    assert (config.distance, config.position_radius, config.top_share) == ("l2", None, None)


def test_fit_flags_set_the_candidates() -> None:
    from producer.cli import build_parser
    from producer.fit_command import config_from_args

    def parsed(argv: str) -> PatchCoreConfig:
        return config_from_args(build_parser().parse_args(argv.split()))

    config = parsed("fit --distance cosine --position-radius 2 --top-share 0.01")
    assert (config.distance, config.position_radius, config.top_share) == ("cosine", 2, 0.01)
    assert parsed("fit") == PatchCoreConfig()


def test_cosine_bank_holds_unit_vectors_and_distances_are_sqrt_2_minus_2_cos(
    fit_with: FitModel, root: Path
) -> None:
    model = fit_with(distance="cosine", scorer="patch")
    bank = model.bank.vectors.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, atol=1e-5)
    batch = _test_batch(root, model.preprocessing)
    raw = extract_patches(model.extractor, model.config, batch).astype(np.float64)
    unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
    cos = (unit.reshape(-1, unit.shape[-1]) @ bank.T).max(axis=1)
    expected = np.sqrt(np.maximum(2 - 2 * cos, 0)).reshape(raw.shape[:3])
    result = model.score_tensors(batch)
    np.testing.assert_allclose(result.patch_maps, expected, rtol=1e-4, atol=1e-5)
    # The whole-image statistics keep the raw features: the embeddings are their mean.
    np.testing.assert_allclose(result.embeddings, raw.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def _masked_brute_force(
    bank: np.ndarray, positions: np.ndarray, queries: np.ndarray, cells: np.ndarray, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest bank row per query among those within the radius, else anywhere (float64)."""
    distances = np.sqrt(((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(axis=2))
    apart = np.abs(cells[:, None].astype(np.int64) - positions[None]).max(axis=2)
    near = np.where(apart <= radius, distances, np.inf)
    fallback = ~np.isfinite(near.min(axis=1))
    near[fallback] = distances[fallback]
    return near.min(axis=1), near.argmin(axis=1)


@pytest.mark.parametrize("radius", [0, 1, 2, 4, 20])
def test_position_aware_search_equals_a_masked_brute_force(radius: int) -> None:
    rng = np.random.default_rng(radius)
    h, w, dim = 9, 11, 16
    positions = np.stack([rng.integers(0, h, 500), rng.integers(0, w, 500)], axis=1)
    # No bank patch in the top-left 3 x 3 cells: with a small radius those queries fall back.
    positions = positions[(positions[:, 0] >= 3) | (positions[:, 1] >= 3)]
    bank = rng.standard_normal((len(positions), dim)).astype(np.float32)
    queries = rng.standard_normal((3 * h * w, dim)).astype(np.float32)
    cells = grid_positions(3, h, w)
    memory = MemoryBank(bank, "flat", positions=positions)
    distances, indices = memory.search_near(queries, cells, radius)
    expected_distances, expected_indices = _masked_brute_force(
        bank, positions, queries, cells, radius
    )
    np.testing.assert_array_equal(indices[:, 0], expected_indices)
    np.testing.assert_allclose(distances[:, 0], expected_distances, rtol=1e-5)
    assert distances.shape == indices.shape == (len(queries), 1)
    if radius <= 1:  # the top-left cell has no bank patch within reach
        assert indices[0, 0] == MemoryBank(bank, "flat").search(queries[:1])[1][0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_position_aware_search_on_cuda_equals_cpu() -> None:
    rng = np.random.default_rng(7)
    positions = rng.integers(0, 28, (5000, 2))
    bank = rng.standard_normal((5000, 64)).astype(np.float32)
    queries = rng.standard_normal((2 * 28 * 28, 64)).astype(np.float32)
    cells = grid_positions(2, 28, 28)
    expected = MemoryBank(bank, positions=positions).search_near(queries, cells, 2)
    got = MemoryBank(bank, device="cuda", positions=positions).search_near(queries, cells, 2)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)


def test_grid_positions_follow_the_stacked_rows() -> None:
    cells = grid_positions(2, 3, 4)
    assert cells.dtype == np.int16 and cells.shape == (24, 2)
    assert cells[13].tolist() == [0, 1]  # row 13 = image 1, cell 1 of 12
    assert cells[11].tolist() == [2, 3]


def test_a_bank_without_positions_refuses_position_aware_search() -> None:
    memory = MemoryBank(np.ones((4, 3), np.float32))
    with pytest.raises(PatchqError, match="does not hold its patches' grid positions"):
        memory.search_near(np.ones((1, 3), np.float32), np.zeros((1, 2), np.int16), 1)


@pytest.mark.parametrize(("share", "hw"), [(0.01, 64), (0.1, 30), (0.25, 64), (0.5, 7), (1.0, 64)])
def test_top_share_pooling_equals_a_numpy_reference(share: float, hw: int) -> None:
    maps = np.random.default_rng(3).random((5, 1, hw)).astype(np.float32)
    k = {0.01: 1, 0.1: 3, 0.25: 16, 0.5: 4, 1.0: 64}[share]  # ceil(share * h * w)
    expected = np.sort(maps.reshape(5, -1), axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(pool_patch_distances(maps, share), expected, rtol=1e-6)
    np.testing.assert_array_equal(pool_patch_distances(maps, None), maps.max(axis=(1, 2)))


def test_a_top_share_model_scores_the_mean_of_its_largest_patch_distances(
    fit_with: FitModel, root: Path
) -> None:
    model = fit_with(top_share=0.05, scorer="patch")
    result = model.score_tensors(_test_batch(root, model.preprocessing))
    flat = np.sort(result.patch_maps.reshape(len(result.patch_maps), -1), axis=1)
    np.testing.assert_allclose(result.image_scores, flat[:, -4:].mean(axis=1), rtol=1e-6)


def test_an_older_model_file_reads_and_scores_exactly_as_before(tmp_path: Path) -> None:
    data = OLD_MODEL.read_bytes()
    with np.load(io.BytesIO(data)) as archive:
        old_arrays = {name: archive[name] for name in archive.files}
    header = json.loads(old_arrays.pop("header").tobytes())
    assert {"distance", "position_radius", "top_share"}.isdisjoint(header["config"])
    assert "bank_positions" not in old_arrays
    model = load_artifact(data, device="cpu")
    config = model.config
    assert (config.distance, config.position_radius, config.top_share) == ("l2", None, None)
    assert model.bank.positions is None
    make_seed_layout(tmp_path, "tex", n_good=10, n_bad=2, n_test=4, size=64)
    result = model.score_tensors(_test_batch(tmp_path, model.preprocessing))
    expected = json.loads(OLD_SCORES.read_text())
    for name in ("image_scores", "patch_scores", "patch_maps"):
        np.testing.assert_allclose(getattr(result, name), expected[name], rtol=1e-6, atol=1e-6)
    # Saved again, it holds the same arrays, and its config only gains the defaults.
    with np.load(io.BytesIO(save_artifact(model, "tex"))) as archive:
        again = {name: archive[name] for name in archive.files}
    new_header = json.loads(again.pop("header").tobytes())
    assert set(again) == set(old_arrays)
    for name, array in old_arrays.items():
        np.testing.assert_array_equal(again[name], array)
    defaults = {"distance": "l2", "position_radius": None, "top_share": None}
    assert new_header["config"] == header["config"] | defaults


ROUND_TRIPS = {
    "cosine": {"distance": "cosine"},
    "position": {"position_radius": 1},
    "top-share": {"top_share": 0.05},
    "all three": {"distance": "cosine", "position_radius": 2, "top_share": 0.05},
    "position, tiled": {"position_radius": 1, "image_size": 96, "tile_size": 64},
}


@pytest.mark.parametrize("options", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_each_candidate_scores_the_same_after_a_save_and_load(
    fit_with: FitModel, root: Path, options: dict
) -> None:
    model = fit_with(**options)
    data = save_artifact(model, "tex")
    loaded = load_artifact(data, device="cpu")
    assert loaded.config == model.config
    batch = _test_batch(root, model.preprocessing)
    before, after = model.score_tensors(batch), loaded.score_tensors(batch)
    np.testing.assert_array_equal(after.image_scores, before.image_scores)
    np.testing.assert_array_equal(after.patch_maps, before.patch_maps)
    positions = read_artifact(data).bank_positions
    if "position_radius" in options:
        assert positions is not None and positions.dtype == np.int16
        np.testing.assert_array_equal(positions, model.bank.positions)
        grid = before.patch_maps.shape[1:]  # tiled: the whole image's stitched grid
        assert (positions.max(axis=0) < grid).all() and (positions.max(axis=0) > 0).all()
    else:
        assert positions is None
    reference = read_model_reference(data)
    assert (reference.distance, reference.position_radius, reference.top_share) == (
        model.config.distance,
        model.config.position_radius,
        model.config.top_share,
    )


def test_a_radius_can_be_tried_on_a_fit_made_without_one(fit_with: FitModel, root: Path) -> None:
    # The fit keeps its bank's grid positions; the coreset does not depend on the radius or
    # the pooling, so the fit made with them holds the same bank and scores the same.
    plain, positioned = fit_with(), fit_with(position_radius=1)
    np.testing.assert_array_equal(plain.bank.vectors, positioned.bank.vectors)
    config = dataclasses.replace(plain.config, position_radius=1)
    tried = PatchCore(
        config,
        plain.extractor,
        plain.bank,
        positioned.calibration,
        plain.global_scorer,
        positioned.part_calibration,
        plain.pixel_scorer,
    )
    batch = _test_batch(root, plain.preprocessing)
    np.testing.assert_array_equal(
        tried.score_tensors(batch).image_scores, positioned.score_tensors(batch).image_scores
    )
    assert "bank_positions" not in np.load(io.BytesIO(save_artifact(plain, "tex"))).files


def test_positions_and_radius_come_together_in_a_file(fit_with: FitModel) -> None:
    data = save_artifact(fit_with(position_radius=1), "tex")
    with np.load(io.BytesIO(data)) as archive:
        arrays = {name: archive[name] for name in archive.files if name != "bank_positions"}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    with pytest.raises(ArtifactError, match="bank positions and position radius"):
        read_artifact(buffer.getvalue())


def test_fit_update_of_a_cosine_position_model_adds_unit_patches_with_their_cells(
    fit_with: FitModel, tmp_path: Path
) -> None:
    model = fit_with(distance="cosine", position_radius=1)
    paths = [
        save(draw_variant(make_texture(64, 4000 + i)), tmp_path / f"variant_{i}.png")
        for i in range(3)
    ]
    features = update_features(model, paths, batch_size=4)
    update = update_model(model, features, "cpu")
    bank = update.model.bank
    assert update.added > 0 and bank.size == model.bank.size + update.added
    np.testing.assert_allclose(np.linalg.norm(bank.vectors, axis=1), 1.0, atol=1e-5)
    assert bank.positions is not None and bank.positions.shape == (bank.size, 2)
    np.testing.assert_array_equal(bank.positions[: model.bank.size], model.bank.positions)
    for vector, cell in zip(
        bank.vectors[model.bank.size :], bank.positions[model.bank.size :], strict=True
    ):
        source = np.flatnonzero((features.patches == vector).all(axis=1))
        assert (features.positions[source] == cell).all()
    # Every update patch is now within the coverage radius of a bank patch it may match.
    distances = update.model.nearest(features.patches, features.positions)[0]
    assert distances.max() <= update.radius + 1e-5
    loaded = read_artifact(save_artifact(update.model, "tex"))
    np.testing.assert_array_equal(loaded.bank_positions, bank.positions)


def test_an_ensemble_of_candidates_scores_the_same_after_a_save_and_load(root: Path) -> None:
    members = [
        dataclasses.replace(BASE, distance="cosine"),
        dataclasses.replace(BASE, position_radius=1, top_share=0.05, layers=("stage2", "stage3")),
    ]
    records = discover(root)
    ensemble = fit_ensemble(records, members, 0.2, "cpu", progress=False).ensemble
    loaded = load_ensemble(save_ensemble(ensemble, "tex"), device="cpu")
    batch = _test_batch(root, ensemble.preprocessing)
    np.testing.assert_array_equal(
        loaded.score_tensors(batch).image_scores, ensemble.score_tensors(batch).image_scores
    )


CANDIDATES = {
    "cosine": {"distance": "cosine"},
    "position": {"position_radius": 1},
    "top-share": {"top_share": 0.05},
}


@pytest.mark.integration
@pytest.mark.parametrize("options", CANDIDATES.values(), ids=CANDIDATES.keys())
def test_a_real_worker_scores_each_candidate_as_in_process(
    cluster_factory: ClusterFactory,
    shared_broker: str,
    postgres_url: str,
    cluster_data: Data,
    options: dict,
) -> None:
    records = discover(cluster_data.root)
    config = dataclasses.replace(CONFIG, **options)
    model = fit_category(records, config, holdout=0.2, device="cpu", progress=False).model
    paths = [r.path for r in records if r.split == "test"]
    scores = model.score_tensors(decode_batch(paths, model.preprocessing).tensor).image_scores
    expected = {str(p.absolute()): float(s) for p, s in zip(paths, scores, strict=True)}
    data = Data(cluster_data.root, save_artifact(model, "tex"), expected)
    cluster = cluster_factory(shared_broker, postgres_url, data=data)
    cluster.start_workers("alpha")
    run_id = cluster.submit()
    cluster.wait_finished(run_id)
    assert_scored_exactly_once(cluster, run_id, data)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "image score: max patch distance (s*)"),
        ({"distance": "cosine"}, "image score: max cosine patch distance (s*)"),
        ({"top_share": 0.01}, "image score: mean of the largest 1% patch distances"),
        (
            {"position_radius": 2},
            "image score: max patch distance (s*) to neighbours within 2 cells",
        ),
    ],
    ids=["default", "cosine", "top-share", "position"],
)
def test_the_report_names_each_candidates_score(options: dict, expected: str) -> None:
    from aggregator.category_data import score_name
    from common.data.images import Preprocessing
    from common.engine.model_file import ModelReference

    empty = np.empty(0)
    reference = ModelReference(empty, empty, Preprocessing(), False, "patch", **options)
    assert score_name(reference) == expected
