"""Read and list objects in S3-compatible storage and on web servers, with retries.

Why boto3 and not fsspec/s3fs: workers fetch from a pool of threads (common.data.batches), and
boto3's client is thread-safe and synchronous, while s3fs runs an asyncio loop per process and
pins aiobotocore to exact botocore releases. boto3 brings the standard credential chain
(environment, shared config and credentials files, instance and container roles) and the
`AWS_ENDPOINT_URL` convention; plain `http(s)://` URIs need no library at all (urllib). boto3 is
an optional extra (`pip install 'patchq[s3]'`), imported only when an `s3://` URI is read.

Failures come in two kinds. A missing or forbidden object is that object's problem
(`ObjectReadError`, reason "404 Not Found" / "403 Forbidden"): the image fails alone, like a
corrupt file. A server that does not answer, answers 5xx or throttles is the store's problem:
each request is retried with exponential backoff, and when the retries run out the caller gets
`ObjectStoreUnavailable`, which must not be recorded on any image (the batch is tried again
later). Credentials are never read, stored or logged here: boto3 finds them itself.
"""

from __future__ import annotations

import http.client
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar

from common.data.locations import ObjectUri
from common.errors import PatchqError
from common.iterables import read_ahead
from common.settings import Settings

if TYPE_CHECKING:
    from botocore.client import BaseClient

RETRIES = 5  # after the first try: 0.25 + 0.5 + 1 + 2 + 4 s of backoff (jittered), ~8 s in all
BACKOFF_S = 0.25
BACKOFF_MAX_S = 4.0
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30
LIST_PAGE = 1000  # keys per listing request: S3's own maximum
READ_AHEAD_PAGES = 2  # pages a walk lists ahead of what it hands on (2,000 keys in memory)
_T = TypeVar("_T")


class ObjectReadError(PatchqError):
    """One object cannot be read (missing, forbidden, a client error): fails only that image."""

    def __init__(self, uri: ObjectUri, reason: str) -> None:
        super().__init__(f"{uri}: {reason}")
        self.uri = uri
        self.reason = reason


class ObjectStoreUnavailable(PatchqError):
    """The store did not answer (or answered 5xx) through every retry: try the work later."""


class _Transient(Exception):
    """One failed request worth retrying; `reason` says what happened."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class FetchCounters:
    """What this process asked of object stores, for logs and benchmarks."""

    requests: int = 0
    retries: int = 0
    unavailable: int = 0  # requests that failed through every retry


counters = FetchCounters()
_counter_lock = threading.Lock()


def _count(**increments: int) -> None:
    with _counter_lock:
        for name, value in increments.items():
            setattr(counters, name, getattr(counters, name) + value)


def read_bytes(uri: ObjectUri) -> bytes:
    """The whole object, fetched with at most `fetch_concurrency` GETs at once per process.

    Only the bytes of the objects in flight are held: nothing is written to disk.
    """
    fetch = _get_s3 if uri.is_s3 else _get_http
    with _get_slots():
        return _with_retries(uri, lambda: fetch(uri))


def list_keys(folder: ObjectUri, delimiter: str | None = None) -> Iterator[tuple[str, bool]]:
    """(key, is_folder) below `folder`, in S3's key order, one page of 1,000 at a time.

    With `delimiter="/"` only the folder's own level comes (sub-folders as their prefix, with
    is_folder True); without, every key below it, streamed, so a prefix of millions of objects
    is never held in memory.
    """
    if not folder.is_s3:
        raise ObjectReadError(
            folder, "web servers cannot be listed; put http(s) URIs in a .csv/.txt manifest"
        )
    pages = _pages(folder, delimiter)
    # A walk reads on while its keys are registered; one level of a folder is read for a look.
    for page in pages if delimiter else read_ahead(pages, READ_AHEAD_PAGES):
        yield from ((entry["Prefix"].rstrip("/"), True) for entry in page.get("CommonPrefixes", ()))
        yield from ((entry["Key"], False) for entry in page.get("Contents", ()))


def _pages(folder: ObjectUri, delimiter: str | None) -> Iterator[dict[str, Any]]:
    """The ListObjectsV2 responses below `folder`, each request retried on its own."""
    request: dict[str, Any] = {"Bucket": folder.host, "Prefix": folder.prefix()}
    if delimiter:
        request["Delimiter"] = delimiter
    while True:
        page = _with_retries(
            folder, lambda: _s3_call(folder, "list_objects_v2", MaxKeys=LIST_PAGE, **request)
        )
        yield page
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _with_retries(uri: ObjectUri, request: Callable[[], _T]) -> _T:
    """`request()`, retried with jittered exponential backoff while it fails transiently."""
    for attempt in range(RETRIES + 1):
        _count(requests=1)
        try:
            return request()
        except _Transient as failure:
            if attempt == RETRIES:
                _count(unavailable=1)
                raise ObjectStoreUnavailable(
                    f"{uri}: object store unavailable after {RETRIES + 1} tries "
                    f"({failure.reason}); check that the server is up (and, for s3://, "
                    "PATCHQ_S3_ENDPOINT_URL)"
                ) from None
            _count(retries=1)
            time.sleep(min(BACKOFF_MAX_S, BACKOFF_S * 2**attempt) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")  # the loop returns or raises


def _status_reason(status: int, code: str = "") -> str:
    """'404 Not Found', with the server's own error code when it adds something."""
    try:
        text = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        text = f"HTTP {status}"
    return f"{text} ({code})" if code and code not in (str(status), text) else text


def _is_transient(status: int) -> bool:
    return status >= 500 or status in (408, 429)


# --- S3 ---------------------------------------------------------------------------------------


def _get_s3(uri: ObjectUri) -> bytes:
    response = _s3_call(uri, "get_object", Bucket=uri.host, Key=uri.key)
    try:
        return response["Body"].read()
    except _connection_errors() as error:  # the body streams after the headers came
        raise _Transient(f"connection lost while reading: {error}") from None


def _s3_call(uri: ObjectUri, operation: str, **request: Any) -> Any:
    """One S3 request, its failures sorted into `_Transient` and `ObjectReadError`."""
    from botocore.exceptions import ClientError, NoCredentialsError

    client = _s3_client()
    try:
        return getattr(client, operation)(**request)
    except ClientError as error:
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        reason = _status_reason(status, error.response.get("Error", {}).get("Code", ""))
        if _is_transient(status):
            raise _Transient(reason) from None
        raise ObjectReadError(uri, reason) from None
    except NoCredentialsError:
        raise ObjectReadError(
            uri,
            "no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, use an instance role, or PATCHQ_S3_ANONYMOUS=1 for a public bucket",
        ) from None
    except _connection_errors() as error:
        raise _Transient(str(error)) from None


@cache
def _connection_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError
    from urllib3.exceptions import HTTPError as Urllib3Error

    return (
        BotoConnectionError,
        HTTPClientError,
        IncompleteReadError,
        Urllib3Error,
        ConnectionError,
        TimeoutError,
    )


@cache
def _settings(pid: int) -> Settings:
    """The settings this process reads objects with, read once (keyed by pid: never inherited)."""
    return Settings.load()


def fetch_concurrency() -> int:
    """How many GETs this process lets be in flight at once (PATCHQ_FETCH_CONCURRENCY)."""
    return _settings(os.getpid()).fetch_concurrency


_client_lock = threading.Lock()
_clients: dict[int, BaseClient] = {}


def _s3_client() -> BaseClient:
    """This process's S3 client, made on first use (never inherited across a fork).

    boto3 clients are thread-safe, so the fetch threads share one and its connection pool,
    sized to the number of GETs allowed at once.
    """
    with _client_lock:
        pid = os.getpid()
        if pid not in _clients:
            _clients[pid] = _new_s3_client(_settings(pid))
        return _clients[pid]


def _new_s3_client(settings: Settings) -> BaseClient:
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError:
        raise PatchqError(
            "reading s3:// URIs needs boto3; install it with `pip install 'patchq[s3]'`"
        ) from None
    config = Config(
        retries={"mode": "standard", "total_max_attempts": 1},  # _with_retries retries
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        max_pool_connections=settings.fetch_concurrency,
        signature_version=UNSIGNED if settings.s3_anonymous else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, config=config
    )


@cache
def _slots(pid: int) -> threading.BoundedSemaphore:
    return threading.BoundedSemaphore(_settings(pid).fetch_concurrency)


def _get_slots() -> threading.BoundedSemaphore:
    return _slots(os.getpid())


# --- HTTP(S) ----------------------------------------------------------------------------------


def _get_http(uri: ObjectUri) -> bytes:
    try:
        with urllib.request.urlopen(str(uri), timeout=READ_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        reason = _status_reason(error.code)
        if _is_transient(error.code):
            raise _Transient(reason) from None
        raise ObjectReadError(uri, reason) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise _Transient(str(getattr(error, "reason", error))) from None
