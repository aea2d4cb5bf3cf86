"""Storage: the SQL schema, its Alembic migrations and the statements patchq runs on it."""
