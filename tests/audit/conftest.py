"""The audit store on each backend (the database_url fixture of tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from audit.store.database import AuditDatabase


@pytest.fixture
def audit_db(database_url: str) -> Iterator[AuditDatabase]:
    db = AuditDatabase(database_url)
    db.migrate()
    yield db
    db.dispose()
