"""The HTML report: written from the database, opened in real headless Chromium, fully offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from aggregator.aggregate import aggregate_run
from aggregator.report import write_report
from common.store.aggregate_schema import Threshold
from common.store.connection import make_engine
from producer.cli import main
from tests.aggregate_data import populate

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,1800",
)


@pytest.fixture
def sqlite_run(tmp_path: Path, dataset):
    engine = make_engine(f"sqlite:///{tmp_path / 'patchq.db'}")
    yield engine, populate(engine, dataset)
    engine.dispose()


@pytest.fixture
def browser(tmp_path: Path):
    """Headless Chromium through chromedriver (Debian: chromium, chromium-driver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver")
    if not (driver_path and shutil.which("chromium")):
        pytest.skip("chromium / chromedriver missing: run `make system-test-deps`")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    yield driver
    driver.quit()


def test_report_opens_in_chromium_with_every_image_and_no_console_error(
    sqlite_run, browser, tmp_path: Path
) -> None:
    engine, run_id = sqlite_run
    index = write_report(engine, run_id, tmp_path / "report")
    assert index.name == "index.html"
    text = index.read_text()
    assert "http://" not in text and "https://" not in text  # nothing from the network
    browser.get(index.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images, i => [i.getAttribute('src'), i.complete,"
        " i.naturalWidth]);"
    )
    # Per category: ROC/PR, confusion, histogram, top anomalies, PCA.
    assert len(images) == 10
    assert all(complete and width > 0 for _, complete, width in images), images
    assert all(not src.startswith(("/", "file:")) for src, _, _ in images)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    assert browser.find_element("id", "tex").is_displayed()
    assert browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_report_keeps_the_policy_last_aggregated(sqlite_run, tmp_path: Path) -> None:
    engine, run_id = sqlite_run
    aggregate_run(engine, run_id, "contamination:25", tmp_path, echo=None)
    index = write_report(engine, run_id, tmp_path)
    assert "contamination:25" in index.read_text()
    with Session(engine) as session:
        assert set(session.scalars(select(Threshold.policy))) == {"contamination:25"}


def test_cli_report_prints_the_page_path(sqlite_run, tmp_path, monkeypatch, capsys) -> None:
    engine, _ = sqlite_run
    monkeypatch.setenv("PATCHQ_DATABASE_URL", str(engine.url))
    assert main(["report", "r1", "--out", str(tmp_path / "out")]) == 0
    printed = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == tmp_path / "out" / "index.html" and printed.is_file()
    assert main(["report", "missing"]) == 2
    assert "error: run 'missing' is not in the database" in capsys.readouterr().err
