"""Alembic environment: runs on the connection guardsync.state hands over, in one transaction.

On PostgreSQL the migration holds a transaction-level advisory lock: two workers opening an
empty database at once take turns, and the second finds the schema at the head (DDL is
transactional there, so it never sees half a schema).
"""

from alembic import context
from sqlalchemy import text

MIGRATION_LOCK = 0x6775617264  # "guard": the advisory lock key of guardsync's migrations

connection = context.config.attributes.get("connection")
if connection is None:  # `alembic revision` while developing: no database needed
    context.configure(url=context.config.get_main_option("sqlalchemy.url"))
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()
