"""Find the images of a data set and what is known about each (split, label, defect, mask).

Reads the seed layout (ROOT/<category>/train/good, train/bad, test/ unlabelled), the MVTec AD
layout (train/good, test/good, test/<defect>/, ground_truth/<defect>/<stem>_mask.png) and plain
archives (a folder tree or a manifest file), on local disk or in a bucket (common.data.listing).
Everything downstream works on `ImageRecord`s, so it does not care which layout the images came
from, nor where they are stored.
"""

from __future__ import annotations

import csv
import itertools
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.data.files import IMAGE_EXTENSIONS
from common.data.listing import entries, is_folder, walk_images
from common.data.locations import Location, ObjectUri, is_uri, to_location
from common.errors import PatchqError

_EXTENSIONS_TEXT = " ".join(sorted(IMAGE_EXTENSIONS))
_MANIFEST_SUFFIXES = frozenset({".csv", ".txt"})
_HEADER_NAMES = frozenset({"path", "file", "filename", "image", "image_path"})
_LABELS = {"0": 0, "good": 0, "1": 1, "bad": 1}
_COLUMNS = (
    ("train good", "train", 0),
    ("train bad", "train", 1),
    ("test good", "test", 0),
    ("test defect", "test", 1),
    ("test unlabelled", "test", None),
)


@dataclass(frozen=True)
class ImageRecord:
    """One image and what the layout says about it."""

    path: Location
    category: str
    split: str  # "train" | "test"
    label: int | None  # 0 normal, 1 anomalous, None unknown
    defect_type: str | None = None  # "good", "bad", a train/bad or MVTec test defect folder, None
    mask_path: Location | None = None  # MVTec ground-truth mask, when there is one


class LayoutError(PatchqError):
    """The data folder is not laid out as patchq expects; the message names the path and the fix."""


def list_categories(root: Location) -> list[str]:
    """Sorted names of the folders under `root` that hold a `train/good` folder."""
    root = _existing_folder(root)
    return [
        child.name
        for child in entries(root)
        if child.is_folder and is_folder(child.location / "train" / "good")
    ]


def discover(root: Location, categories: Sequence[str] | None = None) -> list[ImageRecord]:
    """All images of the given categories (default: every category), in a stable order.

    A category is MVTec AD style when it has `test/good` or `ground_truth/`: each folder under
    `test/` is then a label (good or a defect type). Otherwise `test/` is unlabelled, however
    deeply nested.
    """
    root = _existing_folder(root)
    known = list_categories(root)
    if not known:
        raise LayoutError(
            f"{root}: no category folders with train/good inside; "
            "expected ROOT/<category>/train/good (seed or MVTec AD layout)"
        )
    if isinstance(categories, str):  # one name, not a sequence of its letters
        categories = [categories]
    records: list[ImageRecord] = []
    for category in known if categories is None else categories:
        if category not in known:
            raise _unknown_category(root, category, known)
        records.extend(_discover_category(root / category))
    return records


def _unknown_category(root: Location, category: str, known: list[str]) -> LayoutError:
    folder = root / category
    if is_folder(folder):
        return LayoutError(
            f"{folder}: no train/good folder; put the category's normal images in "
            f"{folder / 'train' / 'good'}"
        )
    return LayoutError(f"{folder}: unknown category {category!r}; known: {', '.join(known)}")


def _discover_category(folder: Location) -> list[ImageRecord]:
    category = folder.name
    good = _images(folder / "train" / "good")
    if not good:
        raise LayoutError(
            f"{folder / 'train' / 'good'}: no images ({_EXTENSIONS_TEXT}); "
            "put the category's normal training images there"
        )
    records = [ImageRecord(p, category, "train", 0, "good") for p in good]
    bad = folder / "train" / "bad"
    records += [ImageRecord(p, category, "train", 1, _defect_kind(bad, p)) for p in _images(bad)]
    test = folder / "test"
    if is_folder(test / "good") or is_folder(folder / "ground_truth"):
        records += _mvtec_test(folder)
    else:
        records += [ImageRecord(p, category, "test", None) for p in _images(test)]
    return records


def _defect_kind(bad: Location, path: Location) -> str:
    """A labelled defect's kind: its folder under train/bad (`train/bad/scratch/1.png`:
    "scratch", as MVTec's `test/<defect>`), or "bad" for one directly in train/bad. Kinds let
    `fit --auto` give each kind its share of both halves it chooses and reports on."""
    inner = path.relative_to(bad).parts
    return inner[0] if len(inner) > 1 else "bad"


def _mvtec_test(folder: Location) -> Iterator[ImageRecord]:
    test = folder / "test"
    for path in _images(test, recursive=False):
        yield ImageRecord(path, folder.name, "test", None)
    for sub in (entry.location for entry in entries(test) if entry.is_folder):
        masks = _masks_by_name(folder / "ground_truth" / sub.name)
        for path in _images(sub):
            if sub.name == "good":
                yield ImageRecord(path, folder.name, "test", 0, "good")
            else:
                mask = masks.get(f"{path.stem}_mask.png".lower())
                yield ImageRecord(path, folder.name, "test", 1, sub.name, mask)


def _masks_by_name(folder: Location) -> dict[str, Location]:
    """Mask files keyed by lower-case name, so `.PNG` masks match too."""
    return {e.name.lower(): e.location for e in entries(folder) if not e.is_folder}


def _images(folder: Location, recursive: bool = True) -> list[Location]:
    """Sorted image files under `folder`, each listed once whatever the case of its extension."""
    return list(walk_images(folder, recursive))


def discover_archive(source: Location, category: str) -> list[ImageRecord]:
    """The images of a folder tree or manifest as a list, each path once (see iter_archive)."""
    records: dict[Location, ImageRecord] = {}
    for record in iter_archive(source, category):
        records.setdefault(record.path, record)
    return list(records.values())


def iter_archive(source: Location, category: str) -> Iterator[ImageRecord]:
    """Images to score from a folder tree (all images, unlabelled) or a manifest file, streamed.

    A manifest (.csv/.txt) has one path per line, optionally a label column (0/1 or good/bad);
    further columns are ignored, a header line is allowed, blank and `#` lines are skipped; its
    first line decides the delimiter (a tab, else a comma). Relative paths are taken from the
    manifest's folder; a line may also be an s3:// or http(s):// URI. A bucket prefix is listed
    like a folder tree, a page of keys at a time. Nothing is held but the current line, so a
    manifest of millions of paths costs no memory; a path listed twice comes twice (registration
    keeps the first). Files are not opened here: a missing or broken image fails on its own
    when scored, and the rest of the run goes on. A source that is missing or empty, or whose
    first line is bad, fails now; a bad later line fails when the stream reaches it.
    """
    source = to_location(source)
    if isinstance(source, ObjectUri) and source.suffix.lower() in _MANIFEST_SUFFIXES:
        raise LayoutError(
            f"{source}: a manifest must be a local file; copy it here (the URIs in it may point "
            "anywhere)"
        )
    if isinstance(source, ObjectUri) or source.is_dir():
        return _started(_archive_folder(source, category))
    if not source.is_file():
        raise LayoutError(f"{source}: not found; give a folder of images or a .csv/.txt manifest")
    if source.suffix.lower() not in _MANIFEST_SUFFIXES:
        raise LayoutError(
            f"{source}: not a folder or a .csv/.txt manifest; give one of those (one path per line)"
        )
    return _started(_read_manifest(source, category))


def _started(records: Iterator[ImageRecord]) -> Iterator[ImageRecord]:
    """`records` with its first item already read, so the errors of an empty source come now."""
    first = next(records)
    return itertools.chain([first], records)


def _archive_folder(folder: Location, category: str) -> Iterator[ImageRecord]:
    found = False
    for path in walk_images(folder):
        found = True
        yield ImageRecord(path, category, "test", None)
    if not found:
        raise LayoutError(
            f"{folder}: no images ({_EXTENSIONS_TEXT}); point at a folder of images "
            "or a .csv/.txt manifest of paths"
        )


def _read_manifest(manifest: Path, category: str) -> Iterator[ImageRecord]:
    with manifest.open(encoding="utf-8-sig", newline="") as lines:
        head = []  # lines up to the first that names a path, which sets the delimiter
        for line in lines:
            head.append(line)
            if line.strip() and not line.strip().startswith("#"):
                break
        delimiter = "\t" if head and "\t" in head[-1] else ","
        rows = _manifest_rows(itertools.chain(head, lines), delimiter)
        first = next(rows, None)
        if first is not None and _is_header(first[1]):
            first = next(rows, None)
        if first is None:
            raise LayoutError(f"{manifest}: no image paths; list one path per line")
        for number, row in itertools.chain([first], rows):
            yield _manifest_record(manifest, category, number, row)


def _manifest_rows(lines: Iterable[str], delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped cells) of the lines that name a path."""
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), 1):
        if row and row[0].strip() and not row[0].strip().startswith("#"):
            yield number, [cell.strip() for cell in row]


def _manifest_record(manifest: Path, category: str, number: int, row: list[str]) -> ImageRecord:
    label = row[1].lower() if len(row) > 1 else ""
    if label and label not in _LABELS:
        raise LayoutError(
            f"{manifest}:{number}: label {row[1]!r} is not 0/1/good/bad; fix or leave it empty"
        )
    value = _LABELS.get(label)
    defect = None if value is None else ("good", "bad")[value]
    path = to_location(row[0]) if is_uri(row[0]) else manifest.parent / Path(row[0]).expanduser()
    return ImageRecord(path, category, "test", value, defect)


def _is_header(row: list[str]) -> bool:
    """A first line is a header if it names the path column or its label is not a label."""
    return row[0].lower() in _HEADER_NAMES or (
        len(row) > 1 and bool(row[1]) and row[1].lower() not in _LABELS
    )


def summarize(records: Sequence[ImageRecord]) -> str:
    """Counts per category and split as an aligned text table (the data-structure check)."""
    counts = Counter((r.category, r.split, r.label) for r in records)
    categories = sorted({r.category for r in records})
    rows = [["category", *(name for name, _, _ in _COLUMNS)]]
    rows += [
        [category, *(str(counts[category, split, label]) for _, split, label in _COLUMNS)]
        for category in categories
    ]
    if len(categories) > 1:
        totals = Counter((r.split, r.label) for r in records)
        rows.append(["all", *(str(totals[split, label]) for _, split, label in _COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        " | ".join(
            cell.rjust(width) if column else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def _existing_folder(root: Location) -> Location:
    root = to_location(root)
    if not is_folder(root):
        raise LayoutError(
            f"{root}: data folder not found; give the folder that holds <category>/train/good"
        )
    return root
