"""Shared fixtures: a database on each backend, a fake clock and a CA driven by it."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from spiffe import TrustDomain

from identity.authority import CASettings, CertificateAuthority
from identity.metrics import IdentityMetrics
from identity.store.database import Database, sqlite_url

# The CI machine runs PostgreSQL here (trust auth); PG_TEST_URL points elsewhere.
PG_ADMIN_URL = os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test")
TRUST_DOMAIN = TrustDomain("example.org")


class FakeClock:
    """A clock tests move by hand; the CA and admin take time from it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


def _postgres_database() -> Iterator[str]:
    name = f"meshward_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL} (set PG_TEST_URL): {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        base = PG_ADMIN_URL.rsplit("/", 1)[0]
        try:
            yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every store-touching test runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path)
    else:
        yield from _postgres_database()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, for PostgreSQL-only behaviour."""
    yield from _postgres_database()


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_ca(db: Database, tmp_path: Path) -> Iterator[Any]:
    """Build (and load) a CA on the test database; extra keyword arguments are CASettings.

    Pass ``registry`` to read its metrics afterwards, ``key_dir`` to share or move keys.
    Call ``ca.flush()`` before reading issued-certificate records: they are group-committed.
    """
    built: list[CertificateAuthority] = []

    def build(  # type: ignore[no-untyped-def]
        clock: FakeClock,
        *,
        upstream=None,
        key_dir: Path | None = None,
        registry: CollectorRegistry | None = None,
        **settings,
    ) -> CertificateAuthority:
        ca = CertificateAuthority(
            db=db,
            trust_domain=TRUST_DOMAIN,
            key_dir=key_dir or tmp_path / "keys",
            settings=CASettings(**settings),
            metrics=IdentityMetrics(registry or CollectorRegistry()),
            upstream=upstream,
        )
        built.append(ca)
        ca.load(clock())
        return ca

    yield build
    for ca in built:
        ca.close()
