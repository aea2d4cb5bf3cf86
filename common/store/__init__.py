"""Storage: the SQL schema, its Alembic migrations and the statements patchq runs on it.

connection.py reaches and migrates the database; the *_schema.py modules and schema.py declare
the tables; every other module holds the statements of one table family. Those take a Session
and never commit: the caller owns the transaction (`with session_factory.begin() as session:`),
so what one step writes across tables lands together or not at all.
"""
