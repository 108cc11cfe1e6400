"""Opening the audit database: engine, SQLite pragmas, read-only sessions, migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError

from audit.errors import StoreError

__all__ = ["VERSION_TABLE", "AuditDatabase", "sqlite_url"]

VERSION_TABLE = "meshward_audit_version"
_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATE_LOCK = 0x6D696772  # "migr"


def sqlite_url(data_dir: Path) -> str:
    """The embedded default: ``<data-dir>/audit/audit.db``."""
    return f"sqlite:///{data_dir.resolve() / 'audit' / 'audit.db'}"


class AuditDatabase:
    """An engine on the audit store. ``read_only`` sessions cannot write (the query API).

    The caller owns every transaction (``engine.begin()``).
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError) as exc:
            # The URL is not echoed: it may hold a password.
            raise StoreError(
                "audit.database_url is not a database URL (check the scheme, host and "
                "numeric port); use sqlite:///path/to/audit.db or "
                "postgresql+psycopg://user@host:5432/db"
            ) from exc
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.display_url = parsed.render_as_string(hide_password=True)
        self.dialect = parsed.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        self.read_only = read_only
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            database = parsed.database
            if database and database != ":memory:":
                Path(database).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        else:
            options = "-c default_transaction_read_only=on" if read_only else ""
            connect_args: dict[str, Any] = {"connect_timeout": 5}
            if options:
                connect_args["options"] = options
            kwargs.update(pool_pre_ping=True, connect_args=connect_args)
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except (NoSuchModuleError, ImportError) as exc:
            raise StoreError(
                f"audit.database_url: no driver for {parsed.drivername!r}; use sqlite or "
                "postgresql+psycopg"
            ) from exc
        if self.is_sqlite:
            event.listen(self.engine, "connect", self._sqlite_pragmas)

    def _sqlite_pragmas(self, dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # Durable across application crashes; an OS crash can lose the last commits, which
        # the shipper re-sends from the spool (its position is in the same transaction).
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA cache_size=-65536")  # 64 MiB: the indexes of a few million rows
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.execute("PRAGMA wal_autocheckpoint=10000")
        if self.read_only:
            cur.execute("PRAGMA query_only=ON")
        cur.close()

    def check(self) -> None:
        """Fail with a message naming the URL when the database cannot be reached."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except DBAPIError as exc:
            raise StoreError(
                f"cannot connect to the audit database {self.display_url}: {describe(exc)}; "
                "check that the server is up and the URL (host, port, user, database) is right"
            ) from exc

    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent)."""
        self.check()
        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    # Several shippers start at once on one database: one migrates.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATE_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except SQLAlchemyError as exc:
            raise StoreError(
                f"migrating the audit database {self.display_url} failed: {exc}"
            ) from exc

    def dispose(self) -> None:
        self.engine.dispose()


def describe(exc: BaseException) -> str:
    """The database's own first line of an error, without SQLAlchemy's wrapping."""
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__
