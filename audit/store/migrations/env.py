"""Alembic environment: runs on the connection handed in by ``AuditDatabase.migrate``."""

from __future__ import annotations

from alembic import context

from audit.store.database import VERSION_TABLE
from audit.store.models import AuditBase

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through audit.store.database.AuditDatabase.migrate")

context.configure(
    connection=connection,
    target_metadata=AuditBase.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
