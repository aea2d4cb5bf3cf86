"""What is in a folder, local or in a bucket: the only place layouts look at storage.

A bucket has no folders, only keys; a "folder" here is a key prefix ending in "/", as every S3
console and tool shows it. Hidden entries (a name starting with ".") are skipped on both: macOS
leaves `._name.png` resource forks that carry an image extension but hold no image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.data.files import is_image_file
from common.data.locations import Location, ObjectUri
from common.data.object_store import list_keys


@dataclass(frozen=True)
class Entry:
    """One thing in a folder: its location and whether it is a folder itself."""

    location: Location
    is_folder: bool

    @property
    def name(self) -> str:
        return self.location.name


def is_folder(location: Location) -> bool:
    """A local directory, or a bucket prefix with at least one object below it."""
    if isinstance(location, Path):
        return location.is_dir()
    return next(list_keys(location, delimiter="/"), None) is not None


def entries(folder: Location) -> list[Entry]:
    """The folder's own level, sorted by name, hidden entries left out; [] for no folder."""
    if isinstance(folder, Path):
        if not folder.is_dir():
            return []
        with os.scandir(folder) as scan:
            found = [
                Entry(Path(e.path), e.is_dir(follow_symlinks=False))
                for e in scan
                if not e.name.startswith(".") and (e.is_dir(follow_symlinks=False) or e.is_file())
            ]
    else:
        found = [
            Entry(ObjectUri(folder.scheme, folder.host, key), is_dir)
            for key, is_dir in list_keys(folder, delimiter="/")
            if not key.rsplit("/", 1)[-1].startswith(".")
        ]
    return sorted(found, key=lambda entry: entry.name)


def walk_images(folder: Location, recursive: bool = True) -> Iterator[Location]:
    """Image files under `folder` in a stable order, streamed.

    Locally one directory at a time in sorted path order, so a tree of millions of files never
    sits in memory whole; linked folders are not followed (as `Path.rglob`), so a link cannot
    loop. In a bucket, a recursive walk is one flat listing in S3's key order, a page at a time.
    """
    if isinstance(folder, ObjectUri) and recursive:
        yield from _walk_bucket(folder)
        return
    for entry in entries(folder):
        if entry.is_folder:
            if recursive:
                yield from walk_images(entry.location)
        elif is_image_file(Path(entry.name)):
            yield entry.location


def _walk_bucket(folder: ObjectUri) -> Iterator[ObjectUri]:
    start = len(folder.prefix())
    for key, _ in list_keys(folder):
        inside = key[start:]
        if is_image_file(Path(inside)) and not any(p.startswith(".") for p in inside.split("/")):
            yield ObjectUri(folder.scheme, folder.host, key)
