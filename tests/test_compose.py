"""docker-compose.yml is valid, reserves a GPU per worker, exposes nothing without a password,
and keeps every secret in .env.

`docker-compose config` (the Debian package; `make system-test-deps` installs it) validates and
interpolates the file without a Docker engine, so this runs on any CI machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings

ROOT = Path(__file__).parents[1]
JOBS = ("fit", "submit", "aggregate", "report")
PATCHQ_SERVICES = ("worker", "flower", "review", *JOBS)
IMAGE_READERS = ("worker", "review", *JOBS)  # the patchq services that open images
REQUIRED_ENV = {
    "POSTGRES_PASSWORD": "pg-test-secret",
    "REDIS_PASSWORD": "redis-test-secret",
    "PATCHQ_FLOWER_BASIC_AUTH": "admin:flower-test-secret",
    "DATA_DIR": "/srv/test-images",
    "MINIO_ROOT_USER": "minio-test-admin",
    "MINIO_ROOT_PASSWORD": "minio-test-secret",
}
S3_ENV = {
    "PATCHQ_S3_ENDPOINT_URL": "http://minio:9000",
    "AWS_ACCESS_KEY_ID": "reader-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "reader-test-secret",
}
TEST_ENV = REQUIRED_ENV | S3_ENV
# Variables whose value is a secret, or a URL that may carry one: the file may only name them.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|AUTH|KEY_ID|ROOT_USER|_URL$|^MC_HOST_")


def _compose_config(directory: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`docker-compose config` on a copy of the project's file next to a test .env."""
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is not installed; run `make system-test-deps`")
    shutil.copy(ROOT / "docker-compose.yml", directory / "docker-compose.yml")
    (directory / ".env").write_text(
        "".join(f"{name}={value}\n" for name, value in env.items()), encoding="utf-8"
    )
    return subprocess.run(
        ["docker-compose", "config"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin"},  # nothing from the developer's shell leaks in
    )


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    result = _compose_config(tmp_path_factory.mktemp("compose"), TEST_ENV)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_env_example_is_a_complete_env_file(tmp_path: Path) -> None:
    """Copying .env.example to .env gives a file compose accepts (and patchq can parse)."""
    lines = (ROOT / ".env.example").read_text(encoding="utf-8").splitlines()
    env = dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))
    assert set(TEST_ENV) <= set(env)
    assert _compose_config(tmp_path, env).returncode == 0


@pytest.mark.parametrize(
    "missing",
    ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "DATA_DIR", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"],
)
def test_missing_secret_or_storage_is_refused(tmp_path: Path, missing: str) -> None:
    env = {name: value for name, value in TEST_ENV.items() if name != missing}
    result = _compose_config(tmp_path, env)
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def test_no_secret_is_written_in_the_file() -> None:
    """Every secret (password, key, login, URL with a password) is a ${VARIABLE} from .env."""
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    written = []
    for name, service in raw["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(variable) and value is not None and "${" not in str(value):
                written.append(f"{name}: {variable}={value}")
    assert not written, "secrets written into docker-compose.yml: " + "; ".join(written)
    # ...and the values of .env.example appear nowhere in the file, not even in a command.
    assert "change-me" not in text and "patchq-reader" not in text


def test_object_store_settings_and_keys_are_passed_through_and_unset_when_absent(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """Empty or absent in .env: the variable is unset in the container (boto3's chain goes on)."""
    for name in IMAGE_READERS:
        environment = services[name]["environment"]
        assert {v: environment[v] for v in S3_ENV} == S3_ENV, name
    result = _compose_config(tmp_path, REQUIRED_ENV)
    assert result.returncode == 0, result.stderr
    without = yaml.safe_load(result.stdout)["services"]
    for name in IMAGE_READERS:
        assert all(without[name]["environment"][v] is None for v in S3_ENV), name


def test_worker_reserves_one_gpu_and_runs_the_default_pipelined_worker(
    services: dict[str, Any],
) -> None:
    worker = services["worker"]
    assert worker["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    # The default: one supervised scoring process, PATCHQ_PIPELINE_DEPTH batches in flight.
    assert worker["command"] == ["worker"]


def test_image_storage_is_read_only_at_the_same_path(services: dict[str, Any]) -> None:
    data = TEST_ENV["DATA_DIR"]
    for name in ("worker", "review", *JOBS):
        assert f"{data}:{data}:ro" in services[name]["volumes"], name


def test_flower_requires_login(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower["command"][0] == "flower"
    assert flower["environment"]["PATCHQ_FLOWER_BASIC_AUTH"] == TEST_ENV["PATCHQ_FLOWER_BASIC_AUTH"]
    assert flower["environment"]["PATCHQ_FLOWER_PORT"] == "5555"
    assert flower["ports"] == ["127.0.0.1:5555:5555/tcp"]


def test_review_page_requires_login_and_listens_on_loopback(services: dict[str, Any]) -> None:
    review = services["review"]
    assert review["entrypoint"] == ["patchq", "review", "--address", "0.0.0.0"]
    assert review["profiles"] == ["review"] and "restart" not in review
    assert "PATCHQ_REVIEW_BASIC_AUTH" in review["environment"]  # patchq refuses to start without
    assert review["environment"]["PATCHQ_REVIEW_PORT"] == "5580"
    assert review["ports"] == ["127.0.0.1:5580:5580/tcp"]


def test_redis_postgres_and_minio_only_on_loopback_and_with_passwords(
    services: dict[str, Any],
) -> None:
    for name in ("redis", "postgres", "minio"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    assert "--requirepass" in services["redis"]["command"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == TEST_ENV["POSTGRES_PASSWORD"]
    assert services["minio"]["environment"] == {
        "MINIO_ROOT_USER": TEST_ENV["MINIO_ROOT_USER"],
        "MINIO_ROOT_PASSWORD": TEST_ENV["MINIO_ROOT_PASSWORD"],
    }
    for name in PATCHQ_SERVICES:
        environment = services[name]["environment"]
        assert "redis-test-secret@redis:6379" in environment["PATCHQ_BROKER_URL"]
        assert "pg-test-secret@postgres:5432" in environment["PATCHQ_DATABASE_URL"]


def test_secrets_reach_only_the_services_that_need_them(services: dict[str, Any]) -> None:
    for name, service in services.items():
        environment = service.get("environment", {})
        assert "POSTGRES_PASSWORD" not in environment or name == "postgres"
        assert "PATCHQ_FLOWER_BASIC_AUTH" not in environment or name == "flower"
        assert "PATCHQ_REVIEW_BASIC_AUTH" not in environment or name == "review"

    def reached_by(variable: str) -> set[str]:
        """Services whose configuration (environment, command, URLs) holds the secret."""
        secret = TEST_ENV[variable]
        return {name for name, service in services.items() if secret in yaml.safe_dump(service)}

    # MinIO's admin login: MinIO and the job that sets up its demo bucket, never patchq.
    assert reached_by("MINIO_ROOT_PASSWORD") == {"minio", "archive"}
    # The object-store keys: the services that read images, and the job that makes them a
    # read-only MinIO user; not Flower, which reads no images.
    assert reached_by("AWS_SECRET_ACCESS_KEY") == {*IMAGE_READERS, "archive"}


def test_every_setting_reaches_the_patchq_services(services: dict[str, Any]) -> None:
    """A new PATCHQ_* setting must be passed through, or .env would silently not apply it."""
    only = {
        "flower": {"PATCHQ_FLOWER_BASIC_AUTH", "PATCHQ_FLOWER_PORT"},
        "review": {"PATCHQ_REVIEW_BASIC_AUTH", "PATCHQ_REVIEW_PORT"},
    }
    settings = {env_var for _, env_var, _, _ in Settings.describe()}
    for name in PATCHQ_SERVICES:
        others = set().union(*(wanted for owner, wanted in only.items() if owner != name))
        assert settings - others <= set(services[name]["environment"]), name


def test_jobs_are_one_shot_services_in_a_profile(services: dict[str, Any]) -> None:
    for name in JOBS:
        assert services[name]["profiles"] == ["jobs"]
        assert services[name]["entrypoint"] == ["patchq", name]
        assert "restart" not in services[name]
    for name in ("redis", "postgres", "minio", "worker", "flower"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up`"


def test_minio_keeps_the_archive_in_a_volume_and_reports_its_health(
    services: dict[str, Any],
) -> None:
    minio = services["minio"]
    assert minio["image"].startswith("minio/minio")
    assert minio["command"][:2] == ["server", "/data"]
    assert "minio-data:/data:rw" in minio["volumes"]
    assert minio["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]
    assert minio["restart"] == "unless-stopped"
    assert "127.0.0.1:9000:9000/tcp" in minio["ports"]


def test_the_demo_fills_a_bucket_once_minio_is_up_and_the_images_are_written(
    services: dict[str, Any],
) -> None:
    writer, archive = services["demo-images"], services["archive"]
    assert writer["profiles"] == archive["profiles"] == ["demo"]
    assert "restart" not in writer and "restart" not in archive
    assert "write_elpv_demo" in writer["entrypoint"][-1]
    assert "environment" not in writer  # it writes public images: it needs no secret
    assert archive["image"].startswith("minio/mc")
    assert archive["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "demo-images": {"condition": "service_completed_successfully"},
    }
    # mc logs in through MC_HOST_<alias>, not a password on its command line.
    user, password = TEST_ENV["MINIO_ROOT_USER"], TEST_ENV["MINIO_ROOT_PASSWORD"]
    assert archive["environment"]["MC_HOST_archive"] == f"http://{user}:{password}@minio:9000"
    script = archive["command"][-1]
    assert password not in script and TEST_ENV["AWS_SECRET_ACCESS_KEY"] not in script
    assert "archive/patchq-demo" in script
    assert "readonly" in script  # patchq's keys become a read-only user, never an admin
