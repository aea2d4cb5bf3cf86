"""Submitting a run: find its images, register them with each category's latest model, and
enqueue the pending ones as batches of ids for the workers.

Registration is idempotent per (run, path): submitting the same source to the same run again
adds nothing and enqueues only what is still pending, which is how a lost queue is refilled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from common.data.layouts import (
    ImageRecord,
    LayoutError,
    discover,
    iter_archive,
    list_categories,
)
from common.data.listing import is_folder
from common.data.locations import Location, ObjectUri
from common.errors import PatchqError
from common.iterables import chunked
from common.store.image_rows import (
    ImageRow,
    count_images,
    pending_id_batches,
    register_images,
    retry_failed,
)
from common.store.model_rows import latest_model_id
from common.store.run_rows import create_run, run_id_by_name
from common.store.schema import Model

if TYPE_CHECKING:
    from celery import Celery

SPLITS = ("test", "train", "all")
REGISTER_CHUNK_IMAGES = 20_000  # images per registration transaction: a few MB of rows


class SubmitError(PatchqError):
    """A run cannot be submitted as asked; the message names what is missing and the fix."""


@dataclass(frozen=True)
class Submission:
    run_id: int
    run_name: str
    added: int  # images new to the run
    pending: int  # images of the run still to score
    retried: int = 0  # failed images put back to pending


def find_images(
    source: Location, categories: Sequence[str] | None, split: str = "test"
) -> Iterable[ImageRecord]:
    """Images to score: a data root's `split` images (a list), or every image of a folder
    tree/manifest/bucket prefix (a stream, read as it is registered).

    A folder counts as a data root when it holds <category>/train/good folders; then
    `categories` picks among them (default: all). A plain folder or manifest needs exactly one
    category, the model its images are scored with.
    """
    if _is_data_root(source, categories):
        records = discover(source, categories or None)
        chosen = [r for r in records if split == "all" or r.split == split]
        if not chosen:
            names = ", ".join(sorted({r.category for r in records}))
            raise SubmitError(
                f"{source}: no {split} images for {names}; add images there "
                "or pick another --split (test, train, all)"
            )
        return chosen
    if not categories or len(categories) != 1:
        raise SubmitError(
            f"{source} is a folder tree or manifest, not a data root; give the category whose "
            "model scores it with exactly one --category"
        )
    if isinstance(source, Path) and not source.exists():
        raise LayoutError(
            f"{source}: not found; give a data root, a folder of images or a manifest"
        )
    return iter_archive(source, categories[0])


def _is_data_root(source: Location, categories: Sequence[str] | None) -> bool:
    """Whether `source` holds <category>/train/good folders.

    A bucket prefix with one --category is asked about that category alone (one request):
    listing its top level to find every category would list all of a flat prefix of millions
    of objects twice, once here and once to register them.
    """
    if isinstance(source, ObjectUri) and categories and len(categories) == 1:
        return is_folder(source / categories[0] / "train" / "good")
    return is_folder(source) and bool(list_categories(source))


def latest_models(session: Session, categories: Sequence[str]) -> dict[str, int]:
    """Each category's newest model id; a category without one is a one-line error."""
    if not categories:
        return {}
    found = {category: latest_model_id(session, category) for category in categories}
    missing = sorted(category for category, model_id in found.items() if model_id is None)
    if missing:
        known = sorted(set(session.scalars(select(Model.category).distinct())))
        raise SubmitError(
            f"no model for category {', '.join(missing)} (models exist for: "
            f"{', '.join(known) or 'none'}); run `patchq fit --data ROOT --category "
            f"{missing[0]}` first"
        )
    return {category: model_id for category, model_id in found.items() if model_id is not None}


def default_run_name() -> str:
    return datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")


def register_run(
    sessions: sessionmaker[Session],
    records: Iterable[ImageRecord],
    run_name: str | None,
    source: str,
    batch_size: int,
    retry: bool = False,
) -> Submission:
    """Create the run (or continue the one of that name) and register its images; with
    ``retry``, its failed images are put back to pending first.

    `records` may be a stream (a manifest of millions of paths): it is registered in chunks of
    REGISTER_CHUNK_IMAGES, one transaction each, so memory stays flat and an interrupted submit
    keeps what it registered; submitting again adds only the rest. The first chunk is read
    before the run is created, so a manifest that is wrong from its first line creates nothing.
    """
    name = run_name or default_run_name()
    chunks = chunked(records, REGISTER_CHUNK_IMAGES)
    first = next(chunks, [])
    upfront = records if isinstance(records, Sequence) else first  # a list: check all now
    with sessions.begin() as session:
        models = latest_models(session, sorted({r.category for r in upfront}))
        run_id = run_id_by_name(session, name) or create_run(session, name, source, batch_size)
        added = register_images(session, run_id, _image_rows(first, models))
    for chunk in chunks:
        with sessions.begin() as session:
            models |= latest_models(session, sorted({r.category for r in chunk} - set(models)))
            added += register_images(session, run_id, _image_rows(chunk, models))
    with sessions.begin() as session:
        retried = retry_failed(session, run_id) if retry else 0
        pending = count_images(session, run_id, "pending")
    return Submission(run_id, name, added, pending, retried)


def _image_rows(records: Iterable[ImageRecord], model_ids: Mapping[str, int]) -> Iterator[ImageRow]:
    return (_image_row(record, model_ids[record.category]) for record in records)


def _image_row(record: ImageRecord, model_id: int) -> ImageRow:
    return ImageRow(
        category=record.category,
        path=str(record.path.absolute()),  # workers may run elsewhere, in another folder
        model_id=model_id,
        split=record.split,
        label=record.label,
        defect_type=record.defect_type,
        mask_path=None if record.mask_path is None else str(record.mask_path.absolute()),
    )


def enqueue_pending(
    app: Celery, sessions: sessionmaker[Session], run_id: int, batch_size: int, queue: str
) -> int:
    """Send the run's pending images as batches of ids; returns the number of batches.

    Ids are read a page at a time (a whole number of batches per page), so enqueueing a run of
    millions of images holds one page in memory, and all batches go through one connection.
    """
    from worker.broker import send_id_batches

    with sessions() as session:
        return send_id_batches(app, run_id, pending_id_batches(session, run_id, batch_size), queue)
