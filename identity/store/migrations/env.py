"""Alembic environment: runs on the connection handed in by ``Database.migrate``."""

from __future__ import annotations

from alembic import context

from identity.store.database import VERSION_TABLE
from identity.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through identity.store.database.Database.migrate")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
