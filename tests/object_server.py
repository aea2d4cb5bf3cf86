"""A real S3-compatible HTTP server for the tests: moto's standalone server, in its own process.

MinIO's server is not on the package registries this project may use; moto's server is (s3fs's
own tests use it). Clients reach it through a TCP forwarder of the test's own (`TcpProxy`), which
is what makes two faults real from a client's side: `stop()` closes the port (connection
refused, connections cut), and `restart()` opens it again only once a fresh moto process holds
what was uploaded before, as a server with storage of its own would (moto keeps objects in
memory). The forwarder can also delay every request, as a distant store would (bench).
By default the server takes any credentials; `enforce_auth()` makes it check them against IAM
users and policies, which is how a forbidden object (403) is made.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
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


class TcpProxy:
    """Forwards connections to 127.0.0.1:`port` on to 127.0.0.1:`target`, each request held
    back `delay_s` first; `close()` refuses new connections and cuts the open ones."""

    def __init__(self, port: int, target: int, delay_s: float = 0.0) -> None:
        self.port, self.target, self.delay_s = port, target, delay_s
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            for connection in self._open:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
                connection.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for source, sink, delay in ((client, upstream, self.delay_s), (upstream, client, 0)):
                threading.Thread(target=self._pump, args=(source, sink, delay), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delay_s: float) -> None:
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                if delay_s:
                    time.sleep(delay_s)
                sink.sendall(chunk)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@dataclass
class ObjectServer:
    """A moto server process behind a `TcpProxy` on `port`, and what the tests uploaded."""

    port: int
    log: Path
    delay_s: float = 0.0
    process: subprocess.Popen[bytes] | None = None
    proxy: TcpProxy | None = None
    internal_port: int = 0
    uploads: dict[tuple[str, str], bytes] = field(default_factory=dict)
    admin: Credentials = ANY_CREDENTIALS

    @property
    def endpoint(self) -> str:
        """Where clients reach the server (through the proxy)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def internal_endpoint(self) -> str:
        """The moto process itself: the tests' own uploads skip the proxy and its delay."""
        return f"http://127.0.0.1:{self.internal_port}"

    def env(self, credentials: Credentials = ANY_CREDENTIALS) -> dict[str, str]:
        """What a patchq process needs to read this server as `credentials`."""
        return {"PATCHQ_S3_ENDPOINT_URL": self.endpoint, **credentials.env()}

    def start(self) -> None:
        self.proxy = TcpProxy(self.port, 0, self.delay_s)
        self.proxy.open()  # first: the port is the server's before moto picks one of its own
        self._start_moto()
        self.proxy.target = self.internal_port

    def stop(self) -> None:
        """The port closes and open connections drop: clients see the server gone."""
        if self.proxy is not None:
            self.proxy.close()
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=20)
            self.process = None

    def restart(self) -> None:
        """A fresh server on the same port, opened only once it holds what it held before."""
        self._start_moto()
        self.admin = ANY_CREDENTIALS
        for bucket in sorted({bucket for bucket, _ in self.uploads}):
            self.client().create_bucket(Bucket=bucket)
        for (bucket, key), body in self.uploads.items():
            self.client().put_object(Bucket=bucket, Key=key, Body=body)
        assert self.proxy is not None
        self.proxy.target = self.internal_port
        self.proxy.open()

    def _start_moto(self) -> None:
        self.internal_port = free_port()
        while self.internal_port == self.port:  # free while the proxy is closed: not moto's
            self.internal_port = free_port()
        argv = [
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(self.internal_port),
        ]
        with self.log.open("ab") as output:
            self.process = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._up():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"moto server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def client(self) -> Any:
        """A boto3 S3 client of the test's own, as the admin."""
        return boto3.client(
            "s3",
            endpoint_url=self.internal_endpoint,
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
            endpoint_url=self.internal_endpoint,
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
            f"{self.internal_endpoint}/moto-api/reset-auth",
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
        url = f"{self.internal_endpoint}/moto-api/"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
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
