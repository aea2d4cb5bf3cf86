"""Writing many image rows at once: the statements that let a run register millions of images.

`append_rows` is the same for any table (predictions use it).

PostgreSQL: the rows are COPY'd into a staging table private to the connection and moved into
`images` with one INSERT .. SELECT .. ON CONFLICT DO NOTHING, in input order. COPY streams rows
without a parameter per value, which is what makes registration run at the server's speed
instead of SQLAlchemy's statement-building speed (about 10x the old multi-row INSERTs).
SQLite: one prepared INSERT OR IGNORE run for every row (executemany), which SQLite does at
hundreds of thousands of rows a second.

Either way a path the run already has is skipped by the unique (run_id, path) index, so
registering the same images again adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from common.iterables import chunked
from common.store.schema import Image, utcnow

# The columns a registration gives; the rest have server defaults (status, attempts) or none.
IMAGE_COLUMNS = ("run_id", "category", "path", "split", "label", "defect_type", "mask_path",
                 "model_id")  # fmt: skip
_STAGE = "image_stage"
SQLITE_CHUNK_ROWS = 10_000
_COLUMNS_SQL = ", ".join(IMAGE_COLUMNS)
_CREATE_STAGE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_STAGE} (
    seq bigserial, run_id integer, category text, path text, split text, label integer,
    defect_type text, mask_path text, model_id integer
)"""
_MOVE_STAGE = f"""
INSERT INTO images ({_COLUMNS_SQL}, updated_at)
SELECT {_COLUMNS_SQL}, :now FROM {_STAGE} ORDER BY seq
ON CONFLICT (run_id, path) DO NOTHING"""


def insert_images(session: Session, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert image rows (IMAGE_COLUMNS keys) unless the run has the path; returns how many
    were new. Runs in the session's transaction, like every repository function."""
    if session.get_bind().dialect.name == "postgresql":
        return _copy_images(session, rows)
    statement = sqlite.insert(Image.__table__).on_conflict_do_nothing(
        index_elements=["run_id", "path"]
    )
    values = [{**row, "updated_at": utcnow()} for row in rows]
    if not values:
        return 0
    result = session.execute(statement.execution_options(preserve_rowcount=True), values)
    return result.rowcount


def _copy_images(session: Session, rows: Iterable[Mapping[str, Any]]) -> int:
    session.execute(text(_CREATE_STAGE))
    append_rows(session, _STAGE, IMAGE_COLUMNS, ([row[n] for n in IMAGE_COLUMNS] for row in rows))
    # Through SQLAlchemy, so a broken foreign key is the IntegrityError callers expect.
    moved = session.execute(
        text(_MOVE_STAGE).execution_options(preserve_rowcount=True), {"now": utcnow()}
    )
    session.execute(text(f"TRUNCATE {_STAGE}"))  # the next chunk on this connection starts empty
    return moved.rowcount


def append_rows(
    session: Session, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Append `rows` (values in `columns` order) to `table`, streamed: COPY on PostgreSQL,
    executemany of SQLITE_CHUNK_ROWS rows at a time on SQLite. No conflict handling: for
    tables the caller has just cleared (predictions) or staging tables."""
    if session.get_bind().dialect.name == "postgresql":
        connection = session.connection().connection.driver_connection  # same transaction
        with (
            connection.cursor() as cursor,
            cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    statement = text(
        f"INSERT INTO {table} ({', '.join(columns)}) "
        f"VALUES ({', '.join(f':{name}' for name in columns)})"
    )
    for chunk in chunked(rows, SQLITE_CHUNK_ROWS):
        session.execute(statement, [dict(zip(columns, row, strict=True)) for row in chunk])
