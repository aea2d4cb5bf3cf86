"""Commands that score nothing start without torch, torchvision or FAISS (issue 12).

Each command runs in a fresh interpreter, as a user would start it; afterwards the script
prints which heavy modules that process imported. Checking `sys.modules` tests the cause
(what gets imported) rather than a start time that depends on the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.data.layouts import iter_archive
from common.store.connection import make_engine, open_database
from common.store.model_rows import store_model
from producer.submission import register_run
from tests.aggregate_data import ScoredCategory, populate

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "faiss", "matplotlib", "sklearn")
PROBE = """
import json, sys
from producer.cli import main
heavy, args = sys.argv[1].split(","), sys.argv[2:]
try:
    code = main(args)
except SystemExit as exit:
    code = exit.code
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""

HELP_COMMANDS = [
    [],
    ["config"],
    *(
        [name, "--help"]
        for name in (
            "fit", "run", "submit", "status", "worker", "demo", "config", "aggregate", "report",
            "flower",
        )
    ),
]  # fmt: skip


def _probe(args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, object]:
    argv = args or ["--help"]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(HEAVY), *argv],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("args", HELP_COMMANDS, ids=lambda a: " ".join(a) or "--help")
def test_help_and_config_import_no_heavy_module(args: list[str], tmp_path: Path) -> None:
    outcome = _probe(args, tmp_path, {})
    assert outcome["code"] == 0
    assert outcome["heavy"] == []


def test_status_and_submit_import_no_heavy_module(tmp_path: Path) -> None:
    """A real status of a registered run, and a submit that stops at the missing broker."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    manifest = tmp_path / "paths.txt"
    manifest.write_text("a.png\nb.png\n")
    with open_database(url) as (_, sessions):
        with sessions.begin() as session:
            store_model(session, "x", b"x", "0" * 64, "none", {}, None, 1)
        register_run(sessions, iter_archive(manifest, "x"), "r", str(manifest), 2)
    env = {"PATCHQ_DATABASE_URL": url}
    assert _probe(["status", "r"], tmp_path, env) == {"code": 0, "heavy": []}
    submit = _probe(["submit", str(manifest), "--category", "x"], tmp_path, env)
    assert submit == {"code": 2, "heavy": []}  # found the images, then: no broker configured


def test_aggregate_imports_neither_torch_nor_faiss(
    tmp_path: Path, dataset: dict[str, ScoredCategory]
) -> None:
    """Aggregating a real fitted and scored run reads the stored model without the engine.

    The category has no masks: pixel metrics of a masked category upsample maps with the
    engine's code and so do import torch, for those images only."""
    url = f"sqlite:///{tmp_path / 'p.db'}"
    engine = make_engine(url)
    populate(engine, {"cell": dataset["cell"]}, name="r")
    engine.dispose()
    env = {"PATCHQ_DATABASE_URL": url}
    outcome = _probe(["aggregate", "r", "--out", str(tmp_path / "out")], tmp_path, env)
    assert outcome["code"] == 0
    assert not {"torch", "torchvision", "faiss"} & set(outcome["heavy"])
