"""The review server: tornado handlers for the page, its JSON, image bytes and verdicts.

Safety, each enforced here rather than trusted to the page:

* every request needs a basic-auth login from PATCHQ_REVIEW_BASIC_AUTH (401 otherwise), and the
  verdict records that user;
* POSTs need tornado's XSRF token (cookie + header), so another site cannot post verdicts
  through a logged-in reviewer's browser;
* images are served by id, looked up in the run's rows; the browser never names a path, so
  there is nothing to traverse;
* database work and drawing run on a thread pool, so a slow overlay never stalls other
  reviewers' requests.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker
from tornado.ioloop import IOLoop
from tornado.web import Application, HTTPError, RequestHandler

from common.data.locations import to_location
from common.data.object_store import ObjectStoreUnavailable
from common.errors import PatchqError
from common.store.reviews import ReviewError, add_verdict
from review.overlay import render_png
from review.queries import (
    PREDICTED,
    REVIEWED,
    Filters,
    image_page,
    overlay_scale,
    run_categories,
    stored_image,
)

PAGE_FILE = Path(__file__).with_name("page.html")
REALM = "patchq review"
T = TypeVar("T")


@dataclass
class ReviewContext:
    """What every handler shares: the run, the database, the logins, cached colour scales."""

    run_id: int
    run_name: str | None
    sessions: sessionmaker[Session]
    logins: dict[str, str]
    scales: dict[str, float] = field(default_factory=dict)

    def read(self, work: Callable[[Session], T]) -> T:
        with self.sessions() as session:
            return work(session)

    def write(self, work: Callable[[Session], T]) -> T:
        with self.sessions.begin() as session:
            return work(session)


class ReviewHandler(RequestHandler):
    """Base: basic-auth login on every request, JSON helpers, work off the event loop."""

    def initialize(self, context: ReviewContext) -> None:
        self.context = context

    def prepare(self) -> None:
        user = self._login()
        if user is None:
            # Finished here rather than raised: send_error would drop the challenge header.
            self.set_status(401)
            self.set_header("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
            self.finish("login required")
            return
        self.current_user = user

    def _login(self) -> str | None:
        """The user whose basic-auth credentials match a configured login, else None."""
        header = self.request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.context.logins.get(user)
        if expected is None or not hmac.compare_digest(password.encode(), expected.encode()):
            return None
        return user

    async def off_loop(self, work: Callable[[], T]) -> T:
        return await IOLoop.current().run_in_executor(None, work)

    def write_json(self, payload: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.write(json.dumps(payload))

    def choice(self, name: str, allowed: tuple[str, ...]) -> str | None:
        """A query argument that must be one of `allowed` or empty (= any); 400 otherwise."""
        value = self.get_query_argument(name, "") or None
        if value is not None and value not in allowed:
            raise HTTPError(400, f"{name} must be one of {', '.join(allowed)}")
        return value


class PageHandler(ReviewHandler):
    def get(self) -> None:
        self.xsrf_token  # noqa: B018  (reading it sets the _xsrf cookie the page posts back)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        title = self.context.run_name or f"run {self.context.run_id}"
        page = PAGE_FILE.read_text(encoding="utf-8")
        user = json.dumps(self.current_user)
        self.write(page.replace("{{run}}", json.dumps(title)).replace("{{user}}", user))


class CategoriesHandler(ReviewHandler):
    async def get(self) -> None:
        run_id = self.context.run_id
        self.write_json(
            await self.off_loop(lambda: self.context.read(lambda s: run_categories(s, run_id)))
        )


class ImagesHandler(ReviewHandler):
    async def get(self) -> None:
        category = self.get_query_argument("category", "")
        if not category:
            raise HTTPError(400, "category is required")
        filters = Filters(
            category,
            self.choice("predicted", PREDICTED),
            self.choice("reviewed", REVIEWED),
            self.get_query_argument("defect_type", "") or None,
        )
        page_text = self.get_query_argument("page", "0")
        if not page_text.isdigit():
            raise HTTPError(400, "page must be a whole number")
        run_id = self.context.run_id
        self.write_json(
            await self.off_loop(
                lambda: self.context.read(lambda s: image_page(s, run_id, filters, int(page_text)))
            )
        )


class ImageBytesHandler(ReviewHandler):
    """/image/<id>.png (?view=plain for the image alone): bytes from the run's own path."""

    async def get(self, image_id: str) -> None:
        view = self.get_query_argument("view", "overlay")
        if view not in ("overlay", "plain"):
            raise HTTPError(400, "view must be overlay or plain")
        png = await self.off_loop(lambda: self._render(int(image_id), view == "overlay"))
        self.set_header("Content-Type", "image/png")
        self.set_header("Cache-Control", "private, max-age=3600")
        self.write(png)

    def _render(self, image_id: int, overlay: bool) -> bytes:
        context = self.context
        stored = context.read(lambda s: stored_image(s, context.run_id, image_id))
        if stored is None:
            raise HTTPError(404, f"image {image_id} is not a scored image of this run")
        scale = None
        if overlay:
            if stored.category not in context.scales:
                context.scales[stored.category] = context.read(
                    lambda s: overlay_scale(s, context.run_id, stored.category)
                )
            scale = context.scales[stored.category]
        try:
            return render_png(
                to_location(stored.path), stored.patch_map, stored.model_config, scale
            )
        except ObjectStoreUnavailable as error:
            raise HTTPError(503, str(error)) from None
        except (OSError, PatchqError) as error:
            raise HTTPError(410, f"image {image_id} cannot be read: {error}") from None


class VerdictHandler(ReviewHandler):
    """POST {"image_id": int, "verdict": "defect" | "normal"}: appends one reviews row."""

    async def post(self) -> None:
        try:
            body = json.loads(self.request.body or b"{}")
            image_id, verdict = int(body["image_id"]), str(body["verdict"])
        except (ValueError, KeyError, TypeError):
            raise HTTPError(400, 'expected {"image_id": int, "verdict": str}') from None
        run_id, reviewer = self.context.run_id, self.current_user

        def store() -> int:
            return self.context.write(lambda s: add_verdict(s, run_id, image_id, verdict, reviewer))

        try:
            review_id = await self.off_loop(store)
        except ReviewError as error:
            raise HTTPError(400, str(error)) from None
        self.write_json(
            {"review_id": review_id, "image_id": image_id, "verdict": verdict, "reviewer": reviewer}
        )


def make_app(context: ReviewContext) -> Application:
    """The tornado application of one run's review page."""
    routes: list[tuple[str, type[ReviewHandler]]] = [
        (r"/", PageHandler),
        (r"/api/categories", CategoriesHandler),
        (r"/api/images", ImagesHandler),
        (r"/image/([0-9]{1,18})\.png", ImageBytesHandler),
        (r"/api/verdict", VerdictHandler),
    ]
    return Application(
        [(pattern, handler, {"context": context}) for pattern, handler in routes],
        xsrf_cookies=True,
    )
