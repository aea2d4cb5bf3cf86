"""Images in object storage, read in this process: listing, layouts, reads, failures, retries.

Against real servers on 127.0.0.1: moto's S3 server (tests.object_server) and a plain HTTP
server from the standard library. The fleet-level behaviour (workers, exactly once, the store
restarting mid-run) is in test_s3_archive.py.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from aggregator.frames import model_frame_image
from common.data import object_store
from common.data.batches import decode_batch
from common.data.images import ImageLoadError, Preprocessing, load_rgb
from common.data.layouts import discover, iter_archive
from common.data.listing import walk_images
from common.data.locations import LocationError, ObjectUri, to_location
from common.data.object_store import (
    ObjectReadError,
    ObjectStoreUnavailable,
    list_keys,
    read_bytes,
)
from common.engine.fit import fit_category
from common.engine.model_config import PatchCoreConfig
from common.iterables import read_ahead
from producer.submission import find_images
from review.overlay import render_png
from synthetic.layouts import make_mvtec_layout, make_seed_layout
from tests.object_server import ObjectServer


def _relative(location: object, root: object) -> str:
    """A record's path below its root, the same text for a folder and a bucket."""
    return str(location).removeprefix(str(root)).lstrip("/")


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seed")
    make_seed_layout(root, "tex", n_good=4, n_bad=2, n_test=5, size=32)
    (root / "tex" / "test" / "._resource_fork.png").write_bytes(b"not an image")
    return root


def test_uris_parse_and_refuse_what_is_not_one() -> None:
    uri = to_location("s3://bucket/a/b/001.PNG")
    assert isinstance(uri, ObjectUri)
    assert (uri.host, uri.key, uri.name, uri.stem, uri.suffix) == (
        "bucket",
        "a/b/001.PNG",
        "001.PNG",
        "001",
        ".PNG",
    )
    assert str(uri.parent / "c.png") == "s3://bucket/a/b/c.png"
    assert to_location("s3://bucket/a/") == to_location("s3://bucket/a")
    assert to_location("~/x.png") == Path.home() / "x.png"
    with pytest.raises(LocationError, match="s3://bucket/key"):
        to_location("s3://")


def test_a_bucket_data_root_is_discovered_as_its_folder_is(s3: ObjectServer, seed: Path) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed, bucket, "data")
    remote_root = to_location(f"s3://{bucket}/data")
    local = [(_relative(r.path, seed), r.split, r.label) for r in discover(seed)]
    remote = [(_relative(r.path, remote_root), r.split, r.label) for r in discover(remote_root)]
    assert remote == local
    assert all(isinstance(r.path, ObjectUri) for r in discover(remote_root))
    assert not any("._" in name for name, _, _ in remote)  # hidden objects are skipped


def test_mvtec_masks_are_found_in_a_bucket(s3: ObjectServer, tmp_path: Path) -> None:
    make_mvtec_layout(tmp_path, "mv", n_train=3, n_test_good=2, n_per_defect=2, size=32)
    bucket = s3.new_bucket()
    s3.upload_tree(tmp_path, bucket)
    records = discover(to_location(f"s3://{bucket}"))
    defects = [r for r in records if r.label == 1]
    assert defects and all(isinstance(r.mask_path, ObjectUri) for r in defects)
    assert {r.mask_path.name for r in defects} == {f"{r.path.stem}_mask.png" for r in defects}


def test_listing_pages_through_a_prefix_in_key_order(
    s3: ObjectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.new_bucket()
    keys = [f"p/{i:03d}.png" for i in range(23)] + ["p/sub/x.jpg", "p/.hidden/y.png", "p/z.txt"]
    for key in keys:
        s3.put(bucket, key, b"x")
    monkeypatch.setattr(object_store, "LIST_PAGE", 5)  # 26 keys: six pages
    assert [key for key, _ in list_keys(to_location(f"s3://{bucket}/p"))] == sorted(keys)
    walked = [str(p) for p in walk_images(to_location(f"s3://{bucket}/p"))]
    assert walked == [f"s3://{bucket}/{k}" for k in sorted(keys) if k.endswith((".png", ".jpg"))
                      and "/." not in k]  # fmt: skip


def test_submit_streams_a_bucket_prefix_or_a_data_root(s3: ObjectServer, seed: Path) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed / "tex" / "test", bucket, "archive/day1")
    s3.upload_tree(seed, bucket, "root")
    streamed = find_images(to_location(f"s3://{bucket}/archive/"), ["tex"])
    assert not isinstance(streamed, list)  # registered as it is listed
    assert [r.path.name for r in streamed] == [f"{i:03d}.png" for i in range(5)]
    from_root = find_images(to_location(f"s3://{bucket}/root"), ["tex"])
    assert [r.path.name for r in from_root] == [f"{i:03d}.png" for i in range(5)]


def test_an_object_decodes_as_its_file_does(s3: ObjectServer, seed: Path) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed / "tex" / "test", bucket)
    local = seed / "tex" / "test" / "001.png"
    remote = to_location(f"s3://{bucket}/001.png")
    assert read_bytes(remote) == local.read_bytes()
    np.testing.assert_array_equal(np.asarray(load_rgb(remote)), np.asarray(load_rgb(local)))


def test_a_model_fitted_from_a_bucket_is_the_one_fitted_from_its_folder(
    s3: ObjectServer, seed: Path
) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed, bucket)
    config = PatchCoreConfig(image_size=32, coreset_ratio=0.5)
    local = fit_category(discover(seed), config, holdout=0.25, device="cpu", progress=False)
    remote = fit_category(
        discover(to_location(f"s3://{bucket}")), config, holdout=0.25, device="cpu", progress=False
    )
    np.testing.assert_array_equal(remote.model.bank.vectors, local.model.bank.vectors)
    np.testing.assert_allclose(remote.model.calibration, local.model.calibration)


def test_report_and_review_pictures_read_objects_as_files(s3: ObjectServer, seed: Path) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed / "tex" / "test", bucket)
    local, remote = seed / "tex" / "test" / "003.png", to_location(f"s3://{bucket}/003.png")
    preprocessing = Preprocessing(image_size=32)
    np.testing.assert_array_equal(
        model_frame_image(remote, preprocessing), model_frame_image(local, preprocessing)
    )
    patch_map, config = np.ones((4, 4), np.float32), {"image_size": 32}
    assert render_png(remote, patch_map, config, 2.0) == render_png(local, patch_map, config, 2.0)


def test_read_ahead_keeps_order_and_raises_where_the_item_would_come() -> None:
    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing() -> Iterator[int]:
        yield 1
        raise ValueError("page 2 failed")

    stream = read_ahead(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="page 2 failed"):
        next(stream)


def test_missing_and_corrupt_objects_fail_alone_with_their_reason(
    s3: ObjectServer, seed: Path
) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed / "tex" / "test", bucket)
    s3.put(bucket, "corrupt.png", b"\x89PNG but not really")
    s3.put(bucket, "empty.png", b"")
    names = ["000.png", "missing.png", "corrupt.png", "empty.png", "001.png"]
    batch = decode_batch(
        [to_location(f"s3://{bucket}/{n}") for n in names], Preprocessing(image_size=32)
    )
    assert batch.ok == [0, 4]
    assert "404 Not Found" in batch.failures[1]
    assert "not an image" in batch.failures[2]
    assert "empty object (0 bytes)" in batch.failures[3]
    with pytest.raises(ImageLoadError, match="NoSuchBucket"):
        load_rgb(to_location("s3://patchq-no-such-bucket/x.png"))


def test_a_manifest_may_list_uris(s3: ObjectServer, seed: Path, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    s3.upload_tree(seed / "tex" / "test", bucket)
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,label\ns3://{bucket}/000.png,good\nlocal.png,bad\n")
    records = list(iter_archive(manifest, "tex"))
    assert records[0].path == ObjectUri("s3", bucket, "000.png")
    assert records[0].label == 0
    assert records[1].path == tmp_path / "local.png"


# --- http(s):// --------------------------------------------------------------------------------


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; answers 503 to the first `failures` requests for /flaky/*."""

    failures = 2

    def do_GET(self) -> None:
        if self.path.startswith("/flaky/"):
            if type(self).failures > 0:
                type(self).failures -= 1
                self.send_error(503)
                return
            self.path = self.path.removeprefix("/flaky")
        super().do_GET()

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def web(seed: Path) -> Iterator[str]:
    handler = partial(_FlakyHandler, directory=str(seed / "tex" / "test"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(object_store, "BACKOFF_S", 0.01)


def test_http_objects_are_read_and_5xx_is_retried_and_counted(
    web: str, seed: Path, quick_retries: None
) -> None:
    _FlakyHandler.failures = 2
    retries = object_store.counters.retries
    data = read_bytes(to_location(f"{web}/flaky/002.png"))
    assert data == (seed / "tex" / "test" / "002.png").read_bytes()
    assert object_store.counters.retries == retries + 2
    with pytest.raises(ImageLoadError, match="404 Not Found"):
        load_rgb(to_location(f"{web}/nothing.png"))


def test_a_store_that_never_answers_is_unavailable_not_a_bad_image(quick_retries: None) -> None:
    with pytest.raises(ObjectStoreUnavailable, match="unavailable after 6 tries"):
        decode_batch([to_location("http://127.0.0.1:9/x.png")], Preprocessing(image_size=32))
    with pytest.raises(ObjectReadError, match="cannot be listed"):
        list(walk_images(to_location("http://127.0.0.1:9/folder")))
