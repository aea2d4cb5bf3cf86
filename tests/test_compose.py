"""docker-compose.yml is valid, reserves a GPU per worker, and exposes nothing without a password.

`docker-compose config` (the Debian package; `make system-test-deps` installs it) validates and
interpolates the file without a Docker engine, so this runs on any CI machine.
"""

from __future__ import annotations

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
TEST_ENV = {
    "POSTGRES_PASSWORD": "pg-test-secret",
    "REDIS_PASSWORD": "redis-test-secret",
    "PATCHQ_FLOWER_BASIC_AUTH": "admin:flower-test-secret",
    "DATA_DIR": "/srv/test-images",
}


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


@pytest.mark.parametrize("missing", ["POSTGRES_PASSWORD", "REDIS_PASSWORD", "DATA_DIR"])
def test_missing_secret_or_storage_is_refused(tmp_path: Path, missing: str) -> None:
    env = {name: value for name, value in TEST_ENV.items() if name != missing}
    result = _compose_config(tmp_path, env)
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


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


def test_redis_and_postgres_only_on_loopback_and_with_passwords(
    services: dict[str, Any],
) -> None:
    for name in ("redis", "postgres"):
        for port in services[name].get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port}"
    assert "--requirepass" in services["redis"]["command"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == TEST_ENV["POSTGRES_PASSWORD"]
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
    for name in ("redis", "postgres", "worker", "flower"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up`"
