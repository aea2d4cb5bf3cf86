"""The models table: fitted artifacts, stored once per content hash and read back by workers.

Workers get their model from the database alone, so every machine of the fleet scores with the
same bytes; new runs take each category's newest model, and a worker asks for the hash first so
its disk cache spares it the artifact's bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.store.connection import DatabaseError, insert_statement
from common.store.schema import Model


def store_model(
    session: Session,
    category: str,
    artifact_bytes: bytes,
    content_hash: str,
    backbone: str,
    config: Mapping[str, Any],
    validation: Mapping[str, Any] | None,
    bank_size: int,
) -> int:
    """Id of the model with this content hash, inserting it unless an identical one is stored."""
    session.execute(
        insert_statement(session, Model)
        .values(
            category=category,
            artifact=artifact_bytes,
            content_hash=content_hash,
            backbone=backbone,
            config=dict(config),
            validation=None if validation is None else dict(validation),
            bank_size=bank_size,
        )
        .on_conflict_do_nothing(index_elements=["content_hash"])
    )
    return session.scalars(select(Model.id).where(Model.content_hash == content_hash)).one()


def latest_model_id(session: Session, category: str) -> int | None:
    """The most recently stored model of `category`, the one new runs score with."""
    return session.scalars(
        select(Model.id).where(Model.category == category).order_by(Model.id.desc()).limit(1)
    ).first()


def model_content_hash(session: Session, model_id: int) -> str:
    """The artifact's hash alone, so a worker can hit its disk cache without fetching the bytes."""
    content_hash = session.scalars(select(Model.content_hash).where(Model.id == model_id)).first()
    if content_hash is None:
        raise _missing_model(model_id)
    return content_hash


def load_model_bytes(session: Session, model_id: int) -> tuple[bytes, str]:
    """The artifact bytes and their content hash."""
    row = session.execute(
        select(Model.artifact, Model.content_hash).where(Model.id == model_id)
    ).first()
    if row is None:
        raise _missing_model(model_id)
    return row.artifact, row.content_hash


def _missing_model(model_id: int) -> DatabaseError:
    return DatabaseError(
        f"model {model_id} is not in the database; fit one with `patchq fit` "
        "and check every machine uses the same PATCHQ_DATABASE_URL"
    )
