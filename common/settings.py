"""One settings object for every patchq process, read from PATCHQ_* env vars, `.env` and CLI flags.

Precedence, strongest first: CLI overrides, the process environment, `./.env`, the defaults.
Every field carries its one-line meaning, so the settings table in docs/operations.md and
`patchq config` are generated from this file and cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from common.errors import PatchqError

ENV_PREFIX = "PATCHQ_"
ENV_FILE = Path(".env")
MASK = "***"
DEFAULT_MODEL_CACHE_DIR = Path.home() / ".cache" / "patchq" / "models"
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
_ENV_LINE = re.compile(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)")
_QUOTED_VALUE = re.compile(r"""(["'])(.*?)\1\s*(?:#.*)?""")


class SettingsError(PatchqError):
    """A setting has a value patchq cannot use; the message names the variable and the fix."""


def _about(meaning: str, shown_default: str | None = None) -> dict[str, str]:
    """Field metadata: the one-line meaning, and how to show a default computed per machine."""
    return {"meaning": meaning} | ({} if shown_default is None else {"shown": shown_default})


@dataclass(frozen=True)
class Settings:
    """Effective configuration; build it with `Settings.load()` rather than the constructor."""

    database_url: str = field(
        default="sqlite:///patchq.db",
        metadata=_about(
            "SQLAlchemy URL of the results database (SQLite file or postgresql+psycopg://…)"
        ),
    )
    broker_url: str | None = field(
        default=None,
        metadata=_about("Celery broker URL (redis://host:6379/0); unset: score in-process"),
    )
    queue: str = field(
        default="patchq",
        metadata=_about("Celery queue that scoring batches are sent to and read from"),
    )
    batch_size: int = field(
        default=32,
        metadata=_about("images per scoring task (the backbone runs on whole batches)"),
    )
    pipeline_depth: int = field(
        default=3,
        metadata=_about(
            "batches scored at once by `patchq run` and a (default) worker: decoding, "
            "on the backbone, being written (1: one batch at a time)"
        ),
    )
    model_cache_dir: Path = field(
        default=DEFAULT_MODEL_CACHE_DIR,
        metadata=_about(
            "where workers keep model artifacts loaded from the database, by content hash",
            shown_default="~/.cache/patchq/models",
        ),
    )
    device: str = field(
        default="auto",
        metadata=_about("torch device: auto (cuda if there is one, else cpu), cpu, cuda:N"),
    )
    max_redeliveries: int = field(
        default=3,
        metadata=_about(
            "times a batch is redelivered after a lost worker before its images are marked failed"
        ),
    )
    task_time_limit_s: int = field(
        default=1800,
        metadata=_about("hard time limit of one scoring task, in seconds"),
    )
    visibility_timeout_s: int = field(
        default=7200,
        metadata=_about(
            "seconds before Redis redelivers an unacknowledged task (must exceed the time limit)"
        ),
    )
    lease_s: int = field(
        default=60,
        metadata=_about(
            "seconds a worker's claim on a batch lasts without a heartbeat; then it is requeued"
        ),
    )
    heartbeat_s: int = field(
        default=5,
        metadata=_about(
            "seconds between a worker's heartbeats (lease renewal, workers table, requeue sweep)"
        ),
    )
    flower_basic_auth: str | None = field(
        default=None,
        metadata=_about(
            "Flower login as user:password (comma-separate several); unset means no login"
        ),
    )
    flower_port: int = field(
        default=5555,
        metadata=_about("port the Flower dashboard listens on"),
    )
    review_basic_auth: str | None = field(
        default=None,
        metadata=_about(
            "review page logins as user:password (comma-separate one per reviewer); required "
            "by `patchq review`, and each verdict records the user"
        ),
    )
    review_port: int = field(
        default=5580,
        metadata=_about("port the review page (`patchq review`) listens on"),
    )
    s3_endpoint_url: str | None = field(
        default=None,
        metadata=_about(
            "S3 API endpoint for MinIO, Ceph and the like (http://minio:9000); unset: AWS, or "
            "AWS_ENDPOINT_URL. Credentials come from the AWS chain, never from here"
        ),
    )
    s3_anonymous: bool = field(
        default=False,
        metadata=_about("read s3:// URIs unsigned, without credentials (public buckets): 1 or 0"),
    )
    fetch_concurrency: int = field(
        default=16,
        metadata=_about(
            "object GETs (s3://, http(s)://) one scoring process keeps in flight at most"
        ),
    )

    @classmethod
    def load(cls, overrides: Mapping[str, object] | None = None) -> Settings:
        """Read `./.env`, then the environment, then `overrides` (field name -> value or None).

        Overrides are meant for CLI flags: a flag the user did not give is passed as None and so
        leaves the environment's value alone.
        """
        values: dict[str, object] = {}
        for source, raw in (
            (f"from {ENV_FILE.name}", _read_env_file(ENV_FILE)),
            ("from the environment", os.environ),
        ):
            for item in dataclasses.fields(cls):
                env_var = ENV_PREFIX + item.name.upper()
                if env_var in raw:
                    values[item.name] = _convert(item.name, env_var, raw[env_var], source)
        for name, value in (overrides or {}).items():
            if name not in _FIELD_NAMES:
                raise KeyError(f"unknown setting {name!r}; known: {', '.join(_FIELD_NAMES)}")
            if value is not None:
                values[name] = _convert(name, name, str(value), "from the command line")
        settings = cls(**values)
        settings._validate()
        return settings

    @classmethod
    def describe(cls) -> list[tuple[str, str, str, str]]:
        """(name, env var, default, meaning) for every setting, in declaration order."""
        return [
            (
                item.name,
                ENV_PREFIX + item.name.upper(),
                item.metadata.get("shown", _show(item.default)),
                item.metadata["meaning"],
            )
            for item in dataclasses.fields(cls)
        ]

    def masked(self) -> dict[str, str]:
        """Every setting as display text, with passwords in URLs and Flower's login as ***."""
        shown = {item.name: _show(getattr(self, item.name)) for item in dataclasses.fields(self)}
        shown["database_url"] = mask_url(self.database_url)
        shown["broker_url"] = mask_url(self.broker_url) if self.broker_url else ""
        shown["s3_endpoint_url"] = mask_url(self.s3_endpoint_url) if self.s3_endpoint_url else ""
        for name in _LOGIN_FIELDS:
            logins = getattr(self, name)
            if logins:
                shown[name] = ",".join(f"{user}:{MASK}" for user in parse_logins(logins))
        return shown

    def _validate(self) -> None:
        """Reject values that parse but cannot work, before any process starts on them."""
        if not _DEVICE_PATTERN.fullmatch(self.device):
            _fail("device", repr(self.device), "is not a device; use auto, cpu, cuda or cuda:N")
        for name in (
            "batch_size",
            "pipeline_depth",
            "task_time_limit_s",
            "visibility_timeout_s",
            "lease_s",
            "heartbeat_s",
            "fetch_concurrency",
        ):
            if getattr(self, name) < 1:
                _fail(name, str(getattr(self, name)), "must be at least 1")
        if self.max_redeliveries < 0:
            _fail("max_redeliveries", str(self.max_redeliveries), "must be 0 or more")
        for name in ("flower_port", "review_port"):
            if not 1 <= getattr(self, name) <= 65535:
                _fail(name, str(getattr(self, name)), "is not a TCP port (1-65535)")
        if self.visibility_timeout_s <= self.task_time_limit_s:
            _fail(
                "visibility_timeout_s",
                str(self.visibility_timeout_s),
                f"must exceed PATCHQ_TASK_TIME_LIMIT_S={self.task_time_limit_s}, or Redis "
                "redelivers batches that are still running",
            )
        if self.lease_s <= 2 * self.heartbeat_s:
            _fail(
                "lease_s",
                str(self.lease_s),
                f"must exceed twice PATCHQ_HEARTBEAT_S={self.heartbeat_s}, or a live worker's "
                "batches are requeued between two heartbeats",
            )
        for name in _LOGIN_FIELDS:
            logins = getattr(self, name)
            if logins and not all(user and password for user, password in _pairs(logins)):
                _fail(name, MASK, "must be user:password (comma-separate several)")


_FIELD_NAMES = tuple(item.name for item in dataclasses.fields(Settings))
_LOGIN_FIELDS = ("flower_basic_auth", "review_basic_auth")


def _pairs(logins: str) -> list[tuple[str, str]]:
    return [(user, password) for user, _, password in (p.partition(":") for p in logins.split(","))]


def parse_logins(logins: str) -> dict[str, str]:
    """user -> password of a validated user:password[,user:password...] setting."""
    return dict(_pairs(logins))


_FIELD_TYPES = typing.get_type_hints(Settings)
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def mask_url(url: str) -> str:
    """`url` with its password replaced by ***, so it can be printed and logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


def _show(value: object) -> str:
    """Display text of a setting value; unset is the empty string, a switch 1 or 0."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)


def _fail(name: str, shown_value: str, problem: str) -> typing.NoReturn:
    raise SettingsError(f"{ENV_PREFIX}{name.upper()}={shown_value} {problem}")


def _convert(name: str, label: str, raw: str, source: str) -> object:
    """Parse the text `raw` of setting `name` into its declared type, naming `label` on error."""
    kind = _FIELD_TYPES[name]
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        (kind,) = (arg for arg in typing.get_args(kind) if arg is not type(None))
    text = raw.strip()
    if optional and not text:
        return None
    if kind is int:
        try:
            return int(text)
        except ValueError:
            default = _show(Settings.__dataclass_fields__[name].default)
            raise SettingsError(
                f"{label}={raw!r} ({source}) is not an integer; "
                f"set it to a whole number like {default}"
            ) from None
    if kind is Path:
        return Path(text).expanduser()
    if kind is bool:
        if text.lower() not in _BOOLEANS:
            raise SettingsError(f"{label}={raw!r} ({source}) is not 1/0, true/false or yes/no")
        return _BOOLEANS[text.lower()]
    if not text:
        raise SettingsError(f"{label} ({source}) is empty; unset it to use the default")
    return text


def _read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a dotenv file; `#` comments, `export`, and quotes are understood.

    A missing file is an empty one. A line that is not KEY=VALUE is an error rather than being
    skipped, because a skipped line is a setting silently not applied.
    """
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(stripped)
        if match is None:
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {stripped!r}")
        values[match[1]] = _unquote(match[2])
    return values


def _unquote(value: str) -> str:
    """The value of a dotenv line: quoted text as is, else up to an inline ` #` comment."""
    quoted = _QUOTED_VALUE.fullmatch(value)
    if quoted is not None:
        return quoted[2]
    return value.split(" #", 1)[0].strip()
