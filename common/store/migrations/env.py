"""Alembic environment: runs patchq's migrations on the connection the caller hands over.

patchq has no alembic.ini; `common.store.connection.init_db` builds the config and passes its
connection in `config.attributes["connection"]`. To write the next revision, do the same with
`alembic.command.revision(config, message=..., autogenerate=True, rev_id="0002")` against a
database at head, then review the generated file.
"""

from __future__ import annotations

from alembic import context

# Imported for their side effect: they register the aggregator's, workers' and reviews tables.
import common.store.aggregate_schema
import common.store.fleet_schema
import common.store.review_schema  # noqa: F401
from common.store.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things, so its later migrations must copy tables (batch mode).
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
