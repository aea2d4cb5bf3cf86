"""The demo writes a real seed-layout data set from elpv-dataset, deterministic and idempotent,
with its source and licence stated."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.data.layouts import discover, discover_archive
from producer.demo_data import DemoDataError, write_elpv_demo


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_counts_and_licence(tmp_path: Path) -> None:
    root = write_elpv_demo(tmp_path / "demo", limit_per_category=40)
    records = discover(root)
    assert {r.category for r in records} == {"mono", "poly"}
    for category in ("mono", "poly"):
        mine = [r for r in records if r.category == category]
        good = sum(r.split == "train" and r.label == 0 for r in mine)
        bad = sum(r.split == "train" and r.label == 1 for r in mine)
        test = sum(r.split == "test" and r.label is None for r in mine)
        assert good >= 15 and bad >= 3 and test >= 8 and good + bad + test <= 42
        assert len({r.path.name for r in mine}) == len(mine)  # no cell in two splits
        answers = discover_archive(root / category / "test_labels.csv", category)
        assert sorted(r.path.name for r in answers) == sorted(
            r.path.name for r in mine if r.split == "test"
        )
        assert {r.label for r in answers} <= {0, 1, None} and 1 in {r.label for r in answers}
    readme = (root / "README.txt").read_text()
    assert "CC BY-NC-SA 4.0" in readme and "Deitsch" in readme and "elpv-dataset" in readme


def test_deterministic_and_idempotent(tmp_path: Path) -> None:
    first = write_elpv_demo(tmp_path / "a", categories=["mono"], limit_per_category=12)
    stamp = (first / "mono" / "test_labels.csv").stat().st_mtime_ns
    assert write_elpv_demo(first, categories=["mono"], limit_per_category=12) == first
    assert (first / "mono" / "test_labels.csv").stat().st_mtime_ns == stamp
    second = write_elpv_demo(tmp_path / "b", categories=["mono"], limit_per_category=12)
    assert _tree(first) == _tree(second)
    assert not list(tmp_path.glob(".*partial*"))


def test_refuses_to_overwrite_other_content(tmp_path: Path) -> None:
    write_elpv_demo(tmp_path / "demo", categories=["mono"], limit_per_category=8)
    with pytest.raises(DemoDataError, match="give an empty or new folder"):
        write_elpv_demo(tmp_path / "demo", categories=["mono"], limit_per_category=9)


@pytest.mark.parametrize(
    "options",
    [{"categories": ["thin-film"]}, {"limit_per_category": 2}, {"bad_train_share": 1.5}],
)
def test_rejects_bad_options(tmp_path: Path, options: dict) -> None:
    with pytest.raises(DemoDataError):
        write_elpv_demo(tmp_path / "demo", **options)
