"""Settings: env and .env parsing, precedence, conversion errors, masking, the docs table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.settings import Settings, SettingsError, mask_url, parse_logins


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PATCHQ_* variables from the machine, and a working directory without a .env."""
    for name in list(os.environ):
        if name.startswith("PATCHQ_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults() -> None:
    settings = Settings.load()
    assert settings.database_url == "sqlite:///patchq.db"
    assert settings.broker_url is None
    assert settings.batch_size == 32
    assert settings.model_cache_dir == Path.home() / ".cache" / "patchq" / "models"
    assert settings.device == "auto"


def test_env_file_is_parsed(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# patchq settings\n"
        "\n"
        "PATCHQ_BATCH_SIZE=8\n"
        'export PATCHQ_QUEUE="gpu jobs"  # quoted, with a comment\n'
        "PATCHQ_BROKER_URL='redis://:pw@redis:6379/0'\n"
        "PATCHQ_MODEL_CACHE_DIR=~/models # inline comment\n"
        "POSTGRES_PASSWORD=not-ours\n"
    )
    settings = Settings.load()
    assert settings.batch_size == 8
    assert settings.queue == "gpu jobs"
    assert settings.broker_url == "redis://:pw@redis:6379/0"
    assert settings.model_cache_dir == Path.home() / "models"


def test_environment_beats_env_file_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("PATCHQ_BATCH_SIZE=8\nPATCHQ_QUEUE=from-file\n")
    monkeypatch.setenv("PATCHQ_BATCH_SIZE", "16")
    assert Settings.load().batch_size == 16
    assert Settings.load().queue == "from-file"
    overridden = Settings.load({"batch_size": 4, "queue": None})
    assert (overridden.batch_size, overridden.queue) == (4, "from-file")


def test_empty_optional_setting_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHQ_BROKER_URL", "")
    assert Settings.load().broker_url is None


def test_conversion_error_names_the_variable_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHQ_BATCH_SIZE", "abc")
    with pytest.raises(SettingsError) as caught:
        Settings.load()
    assert str(caught.value) == (
        "PATCHQ_BATCH_SIZE='abc' (from the environment) is not an integer; "
        "set it to a whole number like 32"
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PATCHQ_BATCH_SIZE", "0", "PATCHQ_BATCH_SIZE=0 must be at least 1"),
        ("PATCHQ_DEVICE", "gpu", "PATCHQ_DEVICE='gpu' is not a device"),
        ("PATCHQ_FLOWER_PORT", "70000", "is not a TCP port"),
        ("PATCHQ_VISIBILITY_TIMEOUT_S", "60", "must exceed PATCHQ_TASK_TIME_LIMIT_S=1800"),
        ("PATCHQ_FLOWER_BASIC_AUTH", "admin", "must be user:password"),
        ("PATCHQ_REVIEW_BASIC_AUTH", "alice:pw,bob", "must be user:password"),
        ("PATCHQ_REVIEW_PORT", "0", "is not a TCP port"),
        ("PATCHQ_QUEUE", " ", "PATCHQ_QUEUE (from the environment) is empty"),
    ],
)
def test_unusable_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings.load()


def test_malformed_env_file_line_is_an_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PATCHQ_BATCH_SIZE=8\nthis is not a setting\n")
    with pytest.raises(SettingsError, match=r"\.env:2: expected KEY=VALUE"):
        Settings.load()


def test_unknown_override_is_a_bug() -> None:
    with pytest.raises(KeyError, match="unknown setting 'batchsize'"):
        Settings.load({"batchsize": 3})


def test_masked_hides_passwords() -> None:
    settings = Settings.load(
        {
            "database_url": "postgresql+psycopg://patchq:pg-secret@db:5432/patchq",
            "broker_url": "redis://:redis-secret@redis:6379/0",
            "flower_basic_auth": "admin:f-secret,ops:other",
            "review_basic_auth": "alice:r-secret:with-colon,bob:r-secret2",
        }
    )
    shown = settings.masked()
    assert shown["database_url"] == "postgresql+psycopg://patchq:***@db:5432/patchq"
    assert shown["broker_url"] == "redis://:***@redis:6379/0"
    assert shown["flower_basic_auth"] == "admin:***,ops:***"
    assert shown["review_basic_auth"] == "alice:***,bob:***"
    assert parse_logins(settings.review_basic_auth or "") == {
        "alice": "r-secret:with-colon",
        "bob": "r-secret2",
    }
    assert shown["batch_size"] == "32"
    assert "secret" not in repr(shown)
    assert set(shown) == {name for name, *_ in Settings.describe()}


def test_mask_url_leaves_urls_without_password_alone() -> None:
    assert mask_url("sqlite:///patchq.db") == "sqlite:///patchq.db"
    assert mask_url("redis://redis:6379/0") == "redis://redis:6379/0"


def test_describe_documents_every_setting() -> None:
    rows = Settings.describe()
    assert [name for name, *_ in rows][:2] == ["database_url", "broker_url"]
    table = {name: (env, default, meaning) for name, env, default, meaning in rows}
    assert table["batch_size"][:2] == ("PATCHQ_BATCH_SIZE", "32")
    assert table["broker_url"][1] == ""
    assert table["model_cache_dir"][1] == "~/.cache/patchq/models"
    assert all(meaning for _, _, meaning in table.values())
