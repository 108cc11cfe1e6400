"""Opening the identity database: engine, SQLite pragmas, connectivity check, migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from identity.errors import StoreError

__all__ = ["VERSION_TABLE", "Database", "sqlite_url"]

VERSION_TABLE = "meshward_identity_version"
_MIGRATIONS = Path(__file__).parent / "migrations"


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'meshward.db'}"


class Database:
    """An engine plus a session factory; the caller owns every transaction."""

    def __init__(self, url: str) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            # The URL is not echoed: it may hold a password.
            raise StoreError(
                "not a database URL (check the scheme, host and numeric port); use "
                "sqlite:///path/to/file.db or postgresql+psycopg://user@host:5432/db",
                field="database_url",
            ) from exc
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.display_url = parsed.render_as_string(hide_password=True)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        kwargs: dict[str, Any] = {}
        if not self.is_sqlite:
            kwargs.update(pool_pre_ping=True, connect_args={"connect_timeout": 5})
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (NoSuchModuleError, ImportError) as exc:
            raise StoreError(
                f"no driver for {parsed.drivername!r}; use sqlite or postgresql+psycopg",
                field="database_url",
            ) from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def check(self) -> None:
        """Fail with a message naming the URL when the database cannot be reached."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise StoreError(
                f"cannot connect to {self.display_url}: {reason}; check that the server is "
                "up and the URL (host, port, user, database) is right",
                field="database_url",
            ) from exc

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        self.check()
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(f"migrating {self.display_url} failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: commits on success, rolls back on any error."""
        with self._store_errors(), self.sessions.begin() as session:
            yield session

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """A Core transaction for hot paths that need no ORM session."""
        with self._store_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _store_errors(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            raise StoreError(f"database error on {self.display_url}: {exc.orig}") from exc

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL is durable across application crashes; only an OS crash can lose
    # the last transactions, which rotation and re-issuance recover from.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()
