"""Where an image lives: a local path, or an object URI (`s3://bucket/key`, `http(s)://host/path`).

Everything that names an image (layouts, the images table, reports, the review page) carries a
`Location`. Local paths stay `pathlib.Path`, so local archives behave exactly as before; an
object URI is an `ObjectUri`, which answers the few path questions the layouts ask (name,
suffix, parent, joining) without ever pretending to be a file the OS could open: `Path` would
fold `s3://bucket` into `s3:/bucket`, and `os.fspath` on a URI would open a local file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from common.errors import PatchqError

SCHEMES = ("s3", "http", "https")
_URI = re.compile(r"^(s3|https?)://", re.IGNORECASE)


class LocationError(PatchqError):
    """A URI patchq cannot read; the message names it and what would work."""


@dataclass(frozen=True, order=True)
class ObjectUri:
    """An object in an S3-compatible bucket or on a web server, addressed by URI.

    `host` is the bucket for `s3://` and `host[:port]` for `http(s)://`; `key` has no leading
    slash and, for a prefix, no trailing one (`s3://bucket/a/` and `s3://bucket/a` are one
    folder, as on a file system).
    """

    scheme: str
    host: str
    key: str

    @classmethod
    def parse(cls, text: str) -> ObjectUri:
        parts = urlsplit(text.strip())
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES or not parts.netloc:
            raise LocationError(
                f"{text}: not an object URI; use s3://bucket/key or http(s)://host/path"
            )
        if scheme == "s3" and (parts.query or parts.fragment):
            raise LocationError(f"{text}: an s3:// URI has no ?query or #fragment; drop them")
        key = parts.path.strip("/")
        if parts.query:
            key += f"?{parts.query}"
        return cls(scheme, parts.netloc, key)

    @property
    def is_s3(self) -> bool:
        return self.scheme == "s3"

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def parent(self) -> ObjectUri:
        parent = str(PurePosixPath(self.key).parent)
        return ObjectUri(self.scheme, self.host, "" if parent == "." else parent)

    def __truediv__(self, name: str) -> ObjectUri:
        return ObjectUri(self.scheme, self.host, "/".join(p for p in (self.key, name) if p))

    def relative_to(self, folder: ObjectUri) -> PurePosixPath:
        """The key below `folder`'s, as `Path.relative_to` gives it for a local folder."""
        return PurePosixPath(self.key).relative_to(folder.key)

    def absolute(self) -> ObjectUri:
        """Already absolute: lets code that makes local paths absolute pass URIs through."""
        return self

    def prefix(self) -> str:
        """The key as a listing prefix for what lies below this folder ("" for a bucket)."""
        return f"{self.key}/" if self.key else ""

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}/{self.key}"


Location = Path | ObjectUri


def is_uri(text: str) -> bool:
    """Whether `text` names an object (s3://, http://, https://) rather than a local path."""
    return bool(_URI.match(text.strip()))


def to_location(text: str | Location) -> Location:
    """A local `Path` (with `~` expanded) or an `ObjectUri`, from what a user or a row says."""
    if not isinstance(text, str):
        return text
    return ObjectUri.parse(text) if is_uri(text) else Path(text).expanduser()
