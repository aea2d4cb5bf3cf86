"""`patchq config` shows what this machine resolves, and never a password."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.settings import ENV_PREFIX, Settings
from producer.cli import main
from producer.config_command import markdown_table

SECRETS = ("pg-s3cret", "redis-s3cret", "flower-s3cret")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PATCHQ_* from the developer's shell, and a working directory without a .env."""
    for _, env_var, _, _ in Settings.describe():
        monkeypatch.delenv(env_var, raising=False)
    monkeypatch.chdir(tmp_path)


def _config_output(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["config"]) == 0
    return capsys.readouterr().out


def _by_variable(out: str) -> dict[str, str]:
    return dict(line.split(maxsplit=1) for line in out.splitlines())


def test_masks_every_password_and_shows_env_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        f"{ENV_PREFIX}DATABASE_URL", "postgresql+psycopg://patchq:pg-s3cret@db:5432/patchq"
    )
    monkeypatch.setenv(f"{ENV_PREFIX}BROKER_URL", "redis://:redis-s3cret@redis:6379/0")
    monkeypatch.setenv(f"{ENV_PREFIX}FLOWER_BASIC_AUTH", "admin:flower-s3cret,ops:flower-s3cret")
    monkeypatch.setenv(f"{ENV_PREFIX}BATCH_SIZE", "8")

    out = _config_output(capsys)
    assert not [secret for secret in SECRETS if secret in out]

    shown = _by_variable(out)
    assert shown["PATCHQ_DATABASE_URL"] == "postgresql+psycopg://patchq:***@db:5432/patchq"
    assert shown["PATCHQ_BROKER_URL"] == "redis://:***@redis:6379/0"
    assert shown["PATCHQ_FLOWER_BASIC_AUTH"] == "admin:***,ops:***"
    assert shown["PATCHQ_BATCH_SIZE"] == "8"


def test_reads_dotenv_and_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    Path(".env").write_text("PATCHQ_QUEUE=gpu-line-3\n", encoding="utf-8")
    shown = _by_variable(_config_output(capsys))
    assert shown["PATCHQ_QUEUE"] == "gpu-line-3"
    assert shown["PATCHQ_BROKER_URL"] == "(unset)"
    assert list(shown) == [env_var for _, env_var, _, _ in Settings.describe()]


def test_markdown_table_has_one_row_per_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--markdown"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == markdown_table()
    rows = out.splitlines()[2:]
    assert len(rows) == len(Settings.describe())
    assert all(row.count(" | ") == 2 for row in rows)  # no meaning text broke a column


def test_docs_settings_table_is_generated() -> None:
    """docs/operations.md's table is pasted from `patchq config --markdown`; this catches drift."""
    operations = Path(__file__).parents[1] / "docs" / "operations.md"
    assert markdown_table() in operations.read_text(encoding="utf-8"), (
        "docs/operations.md's settings table is stale: replace it with `patchq config --markdown`"
    )
