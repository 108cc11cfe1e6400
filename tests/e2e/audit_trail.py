"""Reading what a real authz process recorded: its audit store, as its shipper fills it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from audit.store.database import AuditDatabase, sqlite_url
from audit.store.queries import Filters, get_decision, iter_decisions

__all__ = ["AuditTrail"]

DEADLINE = 30.0  # only keeps a broken run from hanging; nothing asserts durations


@dataclass(frozen=True)
class AuditTrail:
    """The SQLite audit store under an authz process's data dir (or ``url``)."""

    data_dir: Path
    url: str | None = None

    def _db(self) -> AuditDatabase:
        return AuditDatabase(self.url or sqlite_url(self.data_dir), read_only=True)

    def records(self, **filters: str) -> list[dict[str, Any]]:
        """Every stored decision, oldest first (empty before the shipper made the store)."""
        if self.url is None and not (self.data_dir / "audit" / "audit.db").exists():
            return []
        db = self._db()
        try:
            with db.engine.connect() as conn:
                found = list(iter_decisions(conn, Filters.parse(filters, now_us=now_us())))
        except OperationalError:
            return []  # the shipper has not created the tables yet
        finally:
            db.dispose()
        return found[::-1]

    def decision(self, decision_id: str) -> dict[str, Any] | None:
        db = self._db()
        try:
            with db.engine.connect() as conn:
                return get_decision(conn, decision_id)
        except OperationalError:
            return None
        finally:
            db.dispose()

    def wait(
        self,
        condition: Callable[[list[dict[str, Any]]], bool],
        *,
        alive: Callable[[], None] = lambda: None,
    ) -> list[dict[str, Any]]:
        """Poll until ``condition(records)`` holds; ``alive`` asserts the producers still run."""
        deadline = time.monotonic() + DEADLINE
        while True:
            records = self.records()
            if condition(records):
                return records
            alive()
            assert time.monotonic() < deadline, f"audit trail: {len(records)} records, not there"
            time.sleep(0.05)

    def record(
        self, decision_id: str, *, alive: Callable[[], None] = lambda: None
    ) -> dict[str, Any]:
        records = self.wait(
            lambda rs: any(r["decision_id"] == decision_id for r in rs), alive=alive
        )
        return next(r for r in records if r["decision_id"] == decision_id)


def now_us() -> int:
    return time.time_ns() // 1000
