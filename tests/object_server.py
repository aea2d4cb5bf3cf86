"""A real S3-compatible HTTP server for the tests: moto's standalone server, in its own process.

MinIO's server is not on the package registries this project may use; moto's server is (s3fs's
own tests use it). It keeps objects in memory, so `restart()` starts an empty server on the
same port and puts back what was uploaded, as a server with storage of its own would have it.
By default it takes any credentials; `enforce_auth()` makes it check them against IAM users
and policies, which is how a forbidden object (403) is made.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.parallel import free_port

REGION = "us-east-1"
# Any credentials do while auth is not enforced; a secret that a leak check can grep for.
TEST_KEY_ID = "AKIAPATCHQTEST000001"
TEST_SECRET = f"patchq-test-secret-{uuid.uuid4().hex}"
START_TIMEOUT_S = 60


@dataclass(frozen=True)
class Credentials:
    key_id: str
    secret: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
        }


ANY_CREDENTIALS = Credentials(TEST_KEY_ID, TEST_SECRET)


@dataclass
class ObjectServer:
    """One moto server process on 127.0.0.1:`port`, and what the tests uploaded to it."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    uploads: dict[tuple[str, str], bytes] = field(default_factory=dict)
    admin: Credentials = ANY_CREDENTIALS

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, credentials: Credentials = ANY_CREDENTIALS) -> dict[str, str]:
        """What a patchq process needs to read this server as `credentials`."""
        return {"PATCHQ_S3_ENDPOINT_URL": self.endpoint, **credentials.env()}

    def start(self) -> None:
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._up():
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"moto server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=20)
            self.process = None

    def restart(self) -> None:
        """A fresh server on the same port, holding what was uploaded before."""
        self.stop()
        self.start()
        self.admin = ANY_CREDENTIALS
        for bucket in sorted({bucket for bucket, _ in self.uploads}):
            self.client().create_bucket(Bucket=bucket)
        for (bucket, key), body in self.uploads.items():
            self.client().put_object(Bucket=bucket, Key=key, Body=body)

    def client(self) -> Any:
        """A boto3 S3 client of the test's own, as the admin."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.admin.key_id,
            aws_secret_access_key=self.admin.secret,
        )

    def new_bucket(self) -> str:
        bucket = f"patchq-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def put(self, bucket: str, key: str, body: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body)
        self.uploads[bucket, key] = body

    def delete(self, bucket: str, key: str) -> None:
        self.client().delete_object(Bucket=bucket, Key=key)
        self.uploads.pop((bucket, key), None)

    def upload_tree(self, folder: Path, bucket: str, prefix: str = "") -> None:
        """Every file under `folder` as bucket/prefix/<relative path>."""
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = "/".join(p for p in (prefix, path.relative_to(folder).as_posix()) if p)
            self.put(bucket, key, path.read_bytes())

    def enforce_auth(self, denied_prefix: str) -> Credentials:
        """From now on check credentials: returns a reader who may do anything but GET objects
        under `denied_prefix` (an ARN pattern, bucket/prefix); the admin keeps full access."""
        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=TEST_KEY_ID,
            aws_secret_access_key=TEST_SECRET,
        )
        deny = {
            "Effect": "Deny",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{denied_prefix}*",
        }
        allow = {"Effect": "Allow", "Action": "*", "Resource": "*"}
        reader = self._iam_user(iam, "reader", [allow, deny])
        self.admin = self._iam_user(iam, "admin", [allow])
        request = urllib.request.Request(
            f"{self.endpoint}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(request, timeout=10).close()
        return reader

    @staticmethod
    def _iam_user(iam: Any, name: str, statements: list[dict[str, str]]) -> Credentials:
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": statements}
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Credentials(key["AccessKeyId"], key["SecretAccessKey"])

    def _up(self) -> bool:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.endpoint}/moto-api/"):
            return True
        return False


@contextlib.contextmanager
def running_server(folder: Path) -> Iterator[ObjectServer]:
    server = ObjectServer(free_port(), folder / f"moto-{uuid.uuid4().hex[:6]}.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectServer]:
    """One server per pytest process that takes any credentials and is never restarted, so
    patchq's per-process S3 client (made on first use) stays valid for every test here."""
    with running_server(tmp_path_factory.mktemp("moto")) as server:
        yield server


@pytest.fixture
def s3(object_server: ObjectServer, monkeypatch: pytest.MonkeyPatch) -> ObjectServer:
    """`object_server`, with this process's environment pointing patchq at it."""
    for name, value in object_server.env().items():
        monkeypatch.setenv(name, value)
    return object_server


@pytest.fixture
def private_object_server(tmp_path: Path) -> Iterator[ObjectServer]:
    """A server of the test's own, which it may restart or lock down."""
    with running_server(tmp_path) as server:
        yield server
