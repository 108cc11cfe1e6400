"""Identity datastore: SQLAlchemy models, repository functions and Alembic migrations."""
