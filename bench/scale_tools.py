"""What the scale benchmarks share: a throwaway PostgreSQL database and a measured `patchq`.

Every figure of a command comes from a fresh process, measured from outside (wall time and the
peak resident memory the kernel reports for that child), as an operator would see it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

REPO = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get(
    "PATCHQ_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@dataclass(frozen=True)
class Measured:
    wall_s: float
    max_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


@contextmanager
def throwaway_database(keep: bool = False) -> Iterator[str]:
    """URL of a new, empty PostgreSQL database on the test server, dropped afterwards."""
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"patchq_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        if keep:
            print(f"kept database {name}")
        else:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def patchq(args: Sequence[str], env: Mapping[str, str], code: Path = REPO) -> Measured:
    """Run `patchq ARGS` from the source tree `code` in a fresh process; wall time, peak RSS."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PATCHQ_")}
    environment |= {"PYTHONPATH": str(code), **env}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", *args],
            cwd=code,
            env=environment,
            stdout=out,
            stderr=err,
            text=True,
        )
        # wait4 reaps this one child and reports its own peak RSS (getrusage would give the
        # largest child this process ever had).
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Measured(wall, usage.ru_maxrss / 1024, process.returncode, out.read(), err.read())


def python(script: str, env: Mapping[str, str], code: Path = REPO) -> Measured:
    """Run a Python snippet with the checkout `code` on the path (setup steps, not measured)."""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=code,  # `-c` puts the working folder first on sys.path
        env={**os.environ, "PYTHONPATH": str(code), **env},
        capture_output=True,
        text=True,
        check=False,
    )
    return Measured(0.0, 0.0, result.returncode, result.stdout, result.stderr)


def check(measured: Measured) -> Measured:
    """`measured`, or exit with its error output if the command failed."""
    if measured.returncode != 0:
        raise SystemExit(f"command failed ({measured.returncode}):\n{measured.stderr[-2000:]}")
    return measured


def report(step: str, measured: Measured, images: int) -> dict[str, float | str]:
    """Print and return one step's figures (per image of the run: `images`)."""
    figures = {
        "wall_s": round(measured.wall_s, 2),
        "max_rss_mb": round(measured.max_rss_mb),
        "images_per_s": round(images / measured.wall_s),
        "output": measured.stdout.strip().splitlines()[-1] if measured.stdout.strip() else "",
    }
    print(
        f"{step:>9}: {figures['wall_s']:8.2f} s  {figures['images_per_s']:>9,} images/s  "
        f"peak RSS {figures['max_rss_mb']:,} MB | {figures['output']}"
    )
    return figures
