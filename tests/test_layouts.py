"""discover / discover_archive find each image once with the right split and label, in a stable
order, and every layout mistake is a LayoutError that names the path."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.data.layouts import (
    ImageRecord,
    LayoutError,
    discover,
    discover_archive,
    list_categories,
    summarize,
)
from synthetic.layouts import make_mvtec_layout, make_seed_layout, save
from synthetic.textures import make_texture


def _counts(records: list[ImageRecord]) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for r in records:
        key = (r.category, r.split, r.label, r.defect_type)
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_seed_layout(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "tiles", n_good=3, n_bad=2, n_test=4, size=16)
    nested = save(make_texture(16, 9), tmp_path / "tiles" / "test" / "batch2" / "x.png")
    records = discover(tmp_path)
    assert _counts(records) == {
        ("tiles", "train", 0, "good"): 3,
        ("tiles", "train", 1, "bad"): 2,
        ("tiles", "test", None, None): 5,
    }
    assert nested in {r.path for r in records}
    assert records == discover(tmp_path, ["tiles"]) == discover(tmp_path, "tiles")


def test_train_bad_subfolders_name_the_defect_kind(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "tiles", n_good=3, n_bad=1, n_test=1, size=16)
    for kind, seed in (("scratch", 1), ("scratch", 2), ("dent", 3)):
        save(make_texture(16, seed), tmp_path / "tiles/train/bad" / kind / f"{seed}.png")
    save(make_texture(16, 4), tmp_path / "tiles/train/bad/dent/deeper/4.png")
    assert _counts(discover(tmp_path)) == {
        ("tiles", "train", 0, "good"): 3,
        ("tiles", "train", 1, "bad"): 1,
        ("tiles", "train", 1, "scratch"): 2,
        ("tiles", "train", 1, "dent"): 2,
        ("tiles", "test", None, None): 1,
    }


def test_mvtec_layout_with_masks(tmp_path: Path) -> None:
    make_mvtec_layout(tmp_path, "grid", n_train=3, n_test_good=2, n_per_defect=2, size=16)
    records = discover(tmp_path, ["grid"])
    assert _counts(records) == {
        ("grid", "train", 0, "good"): 3,
        ("grid", "test", 0, "good"): 2,
        ("grid", "test", 1, "spot"): 2,
        ("grid", "test", 1, "scratch"): 2,
    }
    for r in records:
        if r.label == 1:
            assert r.mask_path == tmp_path / "grid/ground_truth" / r.defect_type / (
                f"{r.path.stem}_mask.png"
            )
        else:
            assert r.mask_path is None


def test_extensions_case_insensitive_each_file_once(tmp_path: Path) -> None:
    good = tmp_path / "cat" / "train" / "good"
    for name in ("a.png", "b.PNG", "c.JpG", "d.tiff"):
        save(make_texture(16, 0), good / name)
    (good / "notes.txt").write_text("not an image")
    (good / "._a.png").write_bytes(b"macOS resource fork")
    paths = [r.path.name for r in discover(tmp_path)]
    assert paths == ["a.png", "b.PNG", "c.JpG", "d.tiff"]


def test_list_categories_only_counts_folders_with_train_good(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "b", 1, 0, 0, size=16)
    make_seed_layout(tmp_path, "a", 1, 0, 0, size=16)
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.txt").write_text("x")
    assert list_categories(tmp_path) == ["a", "b"]
    assert {r.category for r in discover(tmp_path)} == {"a", "b"}


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="data folder not found"):
        discover(tmp_path / "nope")


def test_root_without_categories(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(LayoutError, match="train/good"):
        discover(tmp_path)


def test_unknown_category_lists_known(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "tiles", 1, 0, 0, size=16)
    with pytest.raises(LayoutError, match="unknown category 'wood'; known: tiles"):
        discover(tmp_path, ["wood"])


def test_category_without_train_good(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "tiles", 1, 0, 0, size=16)
    (tmp_path / "wood" / "train" / "bad").mkdir(parents=True)
    with pytest.raises(LayoutError, match=r"wood: no train/good folder"):
        discover(tmp_path, ["wood"])


def test_empty_train_good(tmp_path: Path) -> None:
    (tmp_path / "tiles" / "train" / "good").mkdir(parents=True)
    (tmp_path / "tiles" / "train" / "good" / "readme.txt").write_text("x")
    with pytest.raises(LayoutError, match=r"good: no images"):
        discover(tmp_path)


def test_archive_folder_tree(tmp_path: Path) -> None:
    save(make_texture(16, 0), tmp_path / "b.png")
    save(make_texture(16, 1), tmp_path / "day1" / "a.JPG")
    records = discover_archive(tmp_path, "tiles")
    assert [r.path for r in records] == [tmp_path / "b.png", tmp_path / "day1" / "a.JPG"]
    assert {(r.category, r.split, r.label) for r in records} == {("tiles", "test", None)}


def test_archive_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no images"):
        discover_archive(tmp_path, "tiles")


def test_manifest_without_labels(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("a.png\n\n# a comment\n/abs/b.png\na.png\n")
    records = discover_archive(manifest, "tiles")
    assert [r.path for r in records] == [tmp_path / "a.png", Path("/abs/b.png")]
    assert all(r.label is None for r in records)


def test_manifest_with_header_and_labels(tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label,note\nimg/a.png,good,x\nimg/b.png,1,y\nimg/c.png,,z\n")
    records = discover_archive(manifest, "tiles")
    assert [(r.path.name, r.label, r.defect_type) for r in records] == [
        ("a.png", 0, "good"),
        ("b.png", 1, "bad"),
        ("c.png", None, None),
    ]
    assert records[0].path == tmp_path / "img" / "a.png"


def test_manifest_tab_separated_without_header(tmp_path: Path) -> None:
    manifest = tmp_path / "list.txt"
    manifest.write_text("my image.png\t0\nother.png\tBAD\n")
    assert [r.label for r in discover_archive(manifest, "c")] == [0, 1]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.csv", "a.png,0\nb.png,maybe\n", r"bad.csv:2: label 'maybe'"),
        ("empty.csv", "path,label\n", "no image paths"),
        ("list.json", "[]", "not a folder or a .csv/.txt manifest"),
    ],
)
def test_manifest_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(LayoutError, match=message):
        discover_archive(tmp_path / name, "c")


def test_archive_missing_source(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="not found"):
        discover_archive(tmp_path / "nope.csv", "c")


def test_summarize_table(tmp_path: Path) -> None:
    make_seed_layout(tmp_path, "tiles", 3, 2, 4, size=16)
    make_mvtec_layout(tmp_path, "grid", 2, 1, 1, size=16)
    lines = summarize(discover(tmp_path)).splitlines()
    assert lines[0].split(" | ")[0].strip() == "category"
    rows = {line.split("|")[0].strip(): [int(c) for c in line.split("|")[1:]] for line in lines[1:]}
    assert rows == {
        "grid": [2, 0, 1, 2, 0],
        "tiles": [3, 2, 0, 0, 4],
        "all": [5, 2, 1, 2, 4],
    }
