"""The review loop end to end: a real `patchq review` server, a real browser marking images
with the keyboard, verdicts in SQL, aggregate labelling with them, `fit --update` learning them.

The data (synthetic/layouts.py make_review_layout) holds a false alarm every patch model makes:
normal images carrying a new, acceptable mark the training images lack, among real defects.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from aggregator.aggregate import aggregate_run
from common.engine.artifact import load_artifact
from common.store.connection import make_engine
from common.store.model_rows import load_model_bytes
from common.store.review_schema import Review
from common.store.reviews import ReviewError, add_verdict, latest_verdicts, record_known_labels
from common.store.schema import Image, Model, Run
from common.store.threshold_queries import category_threshold
from producer.cli import main
from producer.fit_update import reviewed_images
from synthetic.layouts import make_review_layout
from tests.parallel import free_port
from tests.test_report import browser  # noqa: F401  (the headless Chromium fixture)
from tests.update_scores import update_scores

LOGINS = {"alice": "pw-alice", "bob": "pw-bob", "carol": "pw-carol"}
CATEGORY = "tex"
SERVER_START_TIMEOUT_S = 300  # a loaded CI machine imports torch slowly


@dataclass(frozen=True)
class Served:
    """A scored run and the review server serving it."""

    root: Path
    url: str
    port: int
    engine: Engine
    run_id: int
    names: dict[int, str]  # image id -> file name


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A fitted, scored and aggregated run (patch scorer), served by `patchq review`."""
    root = tmp_path_factory.mktemp("review")
    make_review_layout(root / "data", CATEGORY, n_good=16, n_variant=10, n_defect=6)
    url = f"sqlite:///{root / 'patchq.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHQ_DATABASE_URL", url)
        patch.chdir(root)
        args = ["run", str(root / "data"), "--run", "r1", "--image-size", "64"]
        assert main([*args, "--coreset-ratio", "0.25", "--scorer", "patch", "--device", "cpu"]) == 0
    port = free_port()
    env = {
        **os.environ,
        "PATCHQ_DATABASE_URL": url,
        "PATCHQ_REVIEW_BASIC_AUTH": ",".join(f"{u}:{p}" for u, p in LOGINS.items()),
        "PYTHONPATH": str(Path(__file__).parents[1]),
    }
    command = [sys.executable, "-m", "producer.cli", "review", "r1", "--port", str(port)]
    server = subprocess.Popen(
        command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    engine = make_engine(url)
    try:
        _wait_until_serving(server, port)
        with Session(engine) as session:
            run_id = session.scalars(select(Run.id).where(Run.name == "r1")).one()
            names = {
                image_id: Path(path).name
                for image_id, path in session.execute(
                    select(Image.id, Image.path).where(Image.run_id == run_id)
                )
            }
        yield Served(root, url, port, engine, run_id, names)
    finally:
        server.terminate()
        server.wait(timeout=30)
        engine.dispose()


def _wait_until_serving(server: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"patchq review exited: {server.stdout.read()}")  # type: ignore[union-attr]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("patchq review did not start listening")


def _auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{LOGINS[user]}".encode()).decode()


def _request(
    port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One raw HTTP request: the path goes on the wire exactly as given."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


class Reviewer:
    """A logged-in HTTP client holding its own XSRF cookie, as a browser would."""

    def __init__(self, port: int, user: str) -> None:
        self.port, self.user = port, user
        status, headers, _ = _request(port, "GET", "/", {"Authorization": _auth(user)})
        assert status == 200
        cookie = SimpleCookie(headers["Set-Cookie"])
        self.token = cookie["_xsrf"].value

    def mark(self, image_id: int, verdict: str) -> int:
        status, _, body = _request(
            self.port,
            "POST",
            "/api/verdict",
            {
                "Authorization": _auth(self.user),
                "Cookie": f"_xsrf={self.token}",
                "X-XSRFToken": self.token,
                "Content-Type": "application/json",
            },
            json.dumps({"image_id": image_id, "verdict": verdict}).encode(),
        )
        assert status == 200, body
        return json.loads(body)["review_id"]


def _truth(name: str) -> str:
    """The verdict a careful reviewer gives: the marked variants are normal."""
    return "normal" if name.startswith("variant") else "defect"


def test_browser_review_labels_the_run_and_teaches_the_model(
    served: Served,
    browser,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with Session(served.engine) as session:
        old_threshold = category_threshold(session, served.run_id, CATEGORY)
        old_model_id = session.scalars(select(Image.model_id).distinct()).one()
    assert old_threshold is not None and old_threshold.policy.startswith("normal_quantile")
    # Every test image is flagged before review: the variants are false alarms.
    to_review = {i for i, name in served.names.items() if name.startswith(("variant", "defect"))}

    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.setExtraHTTPHeaders", {"headers": {"Authorization": _auth("alice")}}
    )
    browser.get(f"http://127.0.0.1:{served.port}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".card.current"))
    body = browser.find_element(By.TAG_NAME, "body")
    current_id = "return document.querySelector('.card.current')?.dataset.imageId ?? null;"
    marked: dict[int, str] = {}
    while set(marked) != to_review:
        image_id = int(browser.execute_script(current_id))
        name = served.names[image_id]
        key = {"normal": "n", "defect": "d"}[_truth(name)] if image_id in to_review else "s"
        body.send_keys(key)  # marks (or skips) the current card and moves to the next
        if key != "s":
            marked[image_id] = _truth(name)
        if set(marked) != to_review:
            wait.until(lambda b, i=image_id: b.execute_script(current_id) not in (None, str(i)))
    assert set(marked) == to_review
    images = browser.execute_script(
        "return Array.from(document.images, i => [i.complete, i.naturalWidth]);"
    )
    assert images and all(complete and width > 0 for complete, width in images)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []

    # The rows landed in SQL, with the reviewer's login.
    with Session(served.engine) as session:
        rows = session.execute(
            select(Review.image_id, Review.verdict, Review.reviewer).where(
                Review.reviewer == "alice"
            )
        ).all()
        assert {(r.image_id, r.verdict) for r in rows} == set(marked.items())
        latest = latest_verdicts(session, served.run_id, CATEGORY)
        assert {i: v for i, v in latest.items() if i in to_review} == marked

    # aggregate labels the run with them and can now choose a labelled threshold.
    summary = aggregate_run(served.engine, "r1", out_dir=served.root / "out", echo=None)
    (result,) = summary.results
    assert result.data.n_review_labels == len(marked)
    assert result.policy.name == "youden"

    # fit --update learns the reviewed normals; old runs keep their model.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHQ_DATABASE_URL", served.url)
        args = ["fit", "--update", CATEGORY, "--from-run", "r1", "--device", "cpu"]
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "coverage radius" in printed and "held-out validation" in printed
    with Session(served.engine) as session:
        new_model_id = session.scalars(select(func.max(Model.id))).one()
        assert new_model_id != old_model_id
        assert session.scalars(select(Image.model_id).distinct()).all() == [old_model_id]
        before = load_artifact(load_model_bytes(session, old_model_id)[0], "cpu")
        after = load_artifact(load_model_bytes(session, new_model_id)[0], "cpu")
        split = reviewed_images(session, served.run_id, CATEGORY, holdout=0.2, seed=0)
    assert before.bank.size < after.bank.size < before.bank.size * 1.5  # the bank grows little

    scores, threshold = update_scores(before, after, split), old_threshold.value
    old, new = scores.old, scores.new
    assert all(old[p] >= threshold for p in scores.taught)  # they were false alarms
    assert all(new[p] < threshold for p in scores.taught)  # now below the old threshold
    assert all(new[p] < old[p] for p in scores.held_normal)  # unseen variants score lower too
    # Held-out defects keep their scores: a larger bank only shortens distances, and little.
    assert all(0.9 * old[p] <= new[p] <= old[p] for p in scores.held_defect)
    assert all(new[p] >= threshold for p in scores.held_defect)


def test_page_opened_through_a_link_carrying_the_login_loads(
    served: Served,
    browser,  # noqa: F811
) -> None:
    """A link like http://user:password@host/ logs in on opening; the page's own requests must
    not be resolved against that URL, as browsers refuse requests whose URL carries a login."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://alice:{LOGINS['alice']}@127.0.0.1:{served.port}/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").text.startswith(f"{CATEGORY}: threshold")
    tabs = [tab.text for tab in browser.find_elements(By.CSS_SELECTOR, "#tabs button")]
    assert len(tabs) == 1 and tabs[0].startswith(f"{CATEGORY} (")
    loaded = "return Array.from(document.images, i => [i.complete, i.naturalWidth]);"
    wait.until(lambda b: all(complete for complete, _ in b.execute_script(loaded)))
    images = browser.execute_script(loaded)
    assert images and all(width > 0 for _, width in images)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_requests_without_a_valid_login_are_refused(served: Served) -> None:
    status, headers, _ = _request(served.port, "GET", "/")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    wrong = "Basic " + base64.b64encode(b"alice:guess").decode()
    for path in ("/", "/api/categories", "/image/1.png"):
        assert _request(served.port, "GET", path, {"Authorization": wrong})[0] == 401
    assert _request(served.port, "GET", "/", {"Authorization": _auth("alice")})[0] == 200


def test_images_are_served_by_id_of_the_run_never_by_path(served: Served) -> None:
    auth = {"Authorization": _auth("bob")}
    some_id = next(iter(served.names))
    for view in ("overlay", "plain"):
        status, headers, body = _request(
            served.port, "GET", f"/image/{some_id}.png?view={view}", auth
        )
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert body.startswith(b"\x89PNG")
    for path in (
        "/image/../../../../etc/passwd",
        "/image/..%2f..%2f..%2fetc%2fpasswd.png",
        "/image/%2fetc%2fpasswd.png",
        f"/image/{served.root / 'patchq.db'}",
        "/image/99999999.png",  # not an image of this run
        "/image/-1.png",
    ):
        status, _, body = _request(served.port, "GET", path, auth)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and b"SQLite" not in body


def test_cross_site_post_without_the_xsrf_token_is_refused(served: Served) -> None:
    image_id = next(iter(served.names))
    body = json.dumps({"image_id": image_id, "verdict": "defect"}).encode()
    headers = {"Authorization": _auth("carol"), "Content-Type": "application/json"}
    assert _request(served.port, "POST", "/api/verdict", headers, body)[0] == 403
    forged = {**headers, "Cookie": "_xsrf=forged", "X-XSRFToken": "other"}
    assert _request(served.port, "POST", "/api/verdict", forged, body)[0] == 403
    with Session(served.engine) as session:
        assert not session.scalars(select(Review.id).where(Review.reviewer == "carol")).all()


def test_two_reviewers_at_once_lose_no_verdict(served: Served) -> None:
    """bob and carol mark the same (train/good, folder-labelled) images at the same time."""
    with Session(served.engine) as session:
        targets = session.scalars(
            select(Image.id).where(Image.run_id == served.run_id, Image.split == "train")
        ).all()[:8]
    reviewers = {user: Reviewer(served.port, user) for user in ("bob", "carol")}
    written: dict[str, list[tuple[int, int, str]]] = {"bob": [], "carol": []}

    def review(user: str, verdict: str) -> None:
        for image_id in targets:
            written[user].append((reviewers[user].mark(image_id, verdict), image_id, verdict))

    threads = [
        threading.Thread(target=review, args=("bob", "normal")),
        threading.Thread(target=review, args=("carol", "defect")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with Session(served.engine) as session:
        rows = session.execute(
            select(Review.id, Review.image_id, Review.verdict).where(
                Review.reviewer.in_(["bob", "carol"])
            )
        ).all()
        assert sorted(tuple(r) for r in rows) == sorted(written["bob"] + written["carol"])
        latest = latest_verdicts(session, served.run_id, CATEGORY)
    for image_id in targets:
        newest = max(w for w in written["bob"] + written["carol"] if w[1] == image_id)
        assert latest[image_id] == newest[2]


def test_filters_and_pages_come_from_sql(served: Served) -> None:
    auth = {"Authorization": _auth("bob")}
    path = f"/api/images?category={CATEGORY}&predicted=anomalous&page=0"
    status, _, body = _request(served.port, "GET", path, auth)
    page = json.loads(body)
    assert status == 200 and page["threshold"] is not None
    assert all(item["flagged"] for item in page["items"])
    scores = [item["score"] for item in page["items"]]
    assert scores == sorted(scores, reverse=True)
    assert len(page["items"]) <= page["page_size"]
    for bad in ("predicted=maybe", "reviewed=perhaps", "page=-1"):
        query = f"/api/images?category={CATEGORY}&{bad}"
        assert _request(served.port, "GET", query, auth)[0] == 400


def test_review_needs_logins(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATCHQ_DATABASE_URL", f"sqlite:///{tmp_path / 'p.db'}")
    monkeypatch.delenv("PATCHQ_REVIEW_BASIC_AUTH", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["review", "r1"]) == 2
    assert "set PATCHQ_REVIEW_BASIC_AUTH=user:password" in capsys.readouterr().err


def test_verdicts_keep_history_and_the_latest_wins(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        run_ids = []
        for name in ("a", "b"):
            run = Run(name=name, source="/data", batch_size=8)
            session.add(run)
            session.flush()
            run_ids.append(run.id)
        model = Model(
            category="c",
            backbone="b",
            content_hash="0" * 64,
            artifact=b"x",
            config={},
            validation=None,
            bank_size=1,
        )
        session.add(model)
        session.flush()
        image = Image(run_id=run_ids[0], category="c", path="/data/1.png", model_id=model.id)
        session.add(image)
        session.flush()
        add_verdict(session, run_ids[0], image.id, "defect", "alice")
        add_verdict(session, run_ids[0], image.id, "normal", "bob")
        assert latest_verdicts(session, run_ids[0]) == {image.id: "normal"}
        assert latest_verdicts(session, run_ids[0], "other") == {}
        assert session.scalar(select(func.count()).select_from(Review)) == 2
        with pytest.raises(ReviewError, match="not in run"):
            add_verdict(session, run_ids[1], image.id, "normal", "bob")
        with pytest.raises(ReviewError, match="verdict must be one of"):
            add_verdict(session, run_ids[0], image.id, "skip", "bob")


def test_known_labels_are_recorded_once_per_reviewer_on_both_dialects(engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        run = Run(name="lot", source="/data", batch_size=8)
        model = Model(
            category="c", backbone="b", content_hash="0" * 64, artifact=b"x", config={},
            validation=None, bank_size=1,
        )  # fmt: skip
        session.add_all([run, model])
        session.flush()
        for i in range(3):
            session.add(Image(run_id=run.id, category="c", path=f"/d/{i}.png", model_id=model.id))
        session.flush()
        labels = {"/d/0.png": 1, "/d/1.png": 0, "/elsewhere.png": 1}
        assert record_known_labels(session, run.id, labels, "answer key a.csv") == 2
        assert record_known_labels(session, run.id, labels, "answer key a.csv") == 0  # once
        add_verdict(session, run.id, _image_id(session, "/d/0.png"), "normal", "alice")
        assert record_known_labels(session, run.id, {"/d/0.png": 1}, "answer key b.csv") == 1
        verdicts = latest_verdicts(session, run.id)
        assert verdicts == {
            _image_id(session, "/d/0.png"): "defect",  # b.csv's verdict came last
            _image_id(session, "/d/1.png"): "normal",
        }


def _image_id(session: Session, path: str) -> int:
    return session.scalar(select(Image.id).where(Image.path == path))


def test_fit_update_without_reviewed_normals_is_one_line(served: Served, capsys) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHQ_DATABASE_URL", served.url)
        assert main(["fit", "--update", CATEGORY, "--from-run", "nope"]) == 2
        assert main(["fit", "--update", CATEGORY]) == 2
        assert main(["fit"]) == 2
    err = capsys.readouterr().err
    assert "run 'nope' is not in the database" in err
    assert "--update needs --from-run RUN" in err
    assert "fit needs --data ROOT" in err


def test_page_queries_on_both_dialects(engine: Engine) -> None:
    """Sorting, filters and counts of the page, on SQLite and PostgreSQL alike."""
    from common.store.aggregate_schema import Prediction, Threshold
    from common.store.score_rows import upsert_scores
    from review.queries import Filters, image_page, run_categories

    with Session(engine) as session, session.begin():
        run = Run(name="p", source="/data", batch_size=8)
        model = Model(
            category="c",
            backbone="b",
            content_hash="1" * 64,
            artifact=b"x",
            config={},
            validation=None,
            bank_size=1,
        )
        session.add_all([run, model])
        session.flush()
        images = [
            Image(
                run_id=run.id,
                category="c",
                path=f"/data/{i}.png",
                model_id=model.id,
                defect_type="scratch" if i == 2 else None,
            )
            for i in range(4)
        ]
        session.add_all(images)
        session.flush()
        scores = {images[0].id: 1.0, images[1].id: 5.0, images[2].id: 3.0, images[3].id: 9.0}
        upsert_scores(
            session,
            [
                {
                    "run_id": run.id,
                    "image_id": i,
                    "score": s,
                    "patch_map": np.zeros((2, 2)),
                    "worker": "w",
                    "duration_ms": 1.0,
                }
                for i, s in scores.items()
            ],
        )
        session.add(
            Threshold(
                run_id=run.id,
                category="c",
                policy="q",
                value=2.5,
                calibration_set="x",
                evaluation_set="y",
            )
        )
        session.flush()
        flagged = {images[1].id, images[2].id}  # image 3 scores highest but is not flagged
        session.add_all(
            Prediction(
                run_id=run.id,
                image_id=i,
                policy="q",
                category="c",
                score=s,
                is_anomaly=i in flagged,
                role="unlabelled",
            )
            for i, s in scores.items()
        )
        add_verdict(session, run.id, images[2].id, "defect", "alice")
        run_id, ids = run.id, [image.id for image in images]

    with Session(engine) as session:
        page = image_page(session, run_id, Filters("c"), 0)
        assert [item["id"] for item in page["items"]] == [ids[1], ids[2], ids[3], ids[0]]
        assert page["threshold"] == 2.5 and page["total"] == 4
        only = image_page(session, run_id, Filters("c", predicted="anomalous", reviewed="no"), 0)
        assert [item["id"] for item in only["items"]] == [ids[1]]
        typed = image_page(session, run_id, Filters("c", defect_type="scratch"), 0)
        assert [(i["id"], i["verdict"]) for i in typed["items"]] == [(ids[2], "defect")]
        (category,) = run_categories(session, run_id)
        assert (category["flagged"], category["reviewed"], category["images"]) == (2, 1, 4)
        assert category["defect_types"] == ["scratch"]
