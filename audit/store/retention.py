"""Retention: decisions older than ``max_age``, and beyond the newest ``max_rows``, go.

On SQLite rows are deleted in chunks (short transactions, so the shipper and the
query API are never held up for long), up to a whole hour: the cutoff is rounded down
to the hour, so that the hourly rollups lose exactly the hours the decisions lose (a
few more rows than ``max_rows`` may stay, at most an hour's). On PostgreSQL whole
daily partitions are dropped instead of deleting rows: dropping is instant and leaves
no dead tuples to vacuum, at the price of a day's granularity (a partition goes once
all of it is older than ``max_age``; by count, the oldest partitions go while the
newer ones alone hold at least ``max_rows``). Today's partition is never dropped.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, text

from audit.store.database import AuditDatabase
from audit.store.ingest import DAY_US, HOUR_US, partition_name, store_errors

__all__ = ["Retention", "RetentionResult", "enforce_retention"]

log = logging.getLogger(__name__)

_CHUNK = 20_000
_RETENTION_LOCK = 0x72657461  # "reta": one enforcer at a time across shippers
_PARTITION = re.compile(r"^decisions_(\d{8})$")


@dataclass(slots=True, frozen=True)
class Retention:
    max_age_us: int | None = 30 * DAY_US
    max_rows: int | None = 10_000_000


@dataclass(slots=True, frozen=True)
class RetentionResult:
    deleted_rows: int = 0
    dropped_partitions: tuple[str, ...] = ()


def enforce_retention(db: AuditDatabase, retention: Retention, *, now_us: int) -> RetentionResult:
    with store_errors(db, "enforcing audit retention"):
        if db.dialect == "postgresql":
            return _drop_partitions(db, retention, now_us)
        return _delete_rows(db, retention, now_us)


def _delete_rows(db: AuditDatabase, retention: Retention, now_us: int) -> RetentionResult:
    cutoff: int | None = None
    if retention.max_age_us is not None:
        cutoff = now_us - retention.max_age_us
    if retention.max_rows is not None:
        with db.engine.connect() as conn:
            boundary = conn.execute(
                text("SELECT ts FROM decisions ORDER BY ts DESC LIMIT 1 OFFSET :n"),
                {"n": max(retention.max_rows - 1, 0)},
            ).scalar()
        if boundary is not None:
            # The max_rows-th newest and its ties are kept: at most max_rows plus ties.
            cutoff = max(cutoff or 0, int(boundary))
    if cutoff is None:
        return RetentionResult()
    cutoff = cutoff // HOUR_US * HOUR_US
    deleted = 0
    with db.engine.begin() as conn:
        _drop_rollups(conn, cutoff)
    for table in ("dry_run_flips", "decisions"):
        while True:
            with db.engine.begin() as conn:
                count = conn.execute(
                    text(
                        # Table names are this module's constants, never input.
                        f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608
                        f"(SELECT rowid FROM {table} WHERE ts < :cutoff LIMIT {_CHUNK})"
                    ),
                    {"cutoff": cutoff},
                ).rowcount
            if table == "decisions":
                deleted += count
            if count < _CHUNK:
                break
    if deleted:
        log.info("audit: retention deleted %d decisions older than %d", deleted, cutoff)
    return RetentionResult(deleted_rows=deleted)


def _drop_partitions(db: AuditDatabase, retention: Retention, now_us: int) -> RetentionResult:
    today = now_us // DAY_US
    dropped: list[str] = []
    with db.engine.begin() as conn:
        locked = conn.execute(
            text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": _RETENTION_LOCK}
        ).scalar()
        if not locked:
            return RetentionResult()  # another shipper is at it
        days = _partition_days(conn)
        doomed: set[int] = set()
        if retention.max_age_us is not None:
            cutoff = now_us - retention.max_age_us
            doomed |= {d for d in days if (d + 1) * DAY_US <= cutoff and d < today}
        if retention.max_rows is not None:
            counts = {
                d: int(
                    conn.execute(
                        text(f'SELECT count(*) FROM "{partition_name("decisions", d)}"')  # noqa: S608
                    ).scalar()
                    or 0
                )
                for d in days
                if d not in doomed
            }
            remaining = sum(counts.values())
            for day in sorted(counts):
                if day >= today or remaining - counts[day] < retention.max_rows:
                    break
                remaining -= counts[day]
                doomed.add(day)
        for day in sorted(doomed):
            for table in ("dry_run_flips", "decisions"):
                conn.execute(text(f'DROP TABLE IF EXISTS "{partition_name(table, day)}"'))
            dropped.append(partition_name("decisions", day))
        if doomed:
            # Partitions go oldest first: the rollups go up to the end of the newest dropped.
            _drop_rollups(conn, (max(doomed) + 1) * DAY_US)
    if dropped:
        log.info("audit: retention dropped partitions %s", ", ".join(dropped))
    return RetentionResult(dropped_partitions=tuple(dropped))


def _drop_rollups(conn: Connection, before_us: int) -> None:
    conn.execute(text("DELETE FROM decision_minutes WHERE minute_us < :t"), {"t": before_us})
    conn.execute(text("DELETE FROM decision_hours WHERE hour_us < :t"), {"t": before_us})


def _partition_days(conn: Connection) -> list[int]:
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'decisions'"
        )
    ).scalars()
    days = []
    for name in names:
        match = _PARTITION.match(name)
        if match:
            day = datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=UTC)
            days.append(int(day.timestamp()) // 86400)
    return sorted(days)
