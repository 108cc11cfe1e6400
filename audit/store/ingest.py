"""Spool entries → rows, and the one transaction that stores a batch with its position.

The batch's rows, its policy sets and the spool's new position are committed
together: after a crash on either side the shipper resumes exactly where the store
says it stopped. Inserts also ignore a ``decision_id`` already stored (at its time),
so a spool shipped twice, or copied, still stores each decision once. The rollups
(``decision_minutes``, ``decision_hours``) count the rows the same transaction
inserted, and only those, so they always agree with ``decisions``.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import Connection, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from audit.errors import StoreError
from audit.spool import KIND_DECISION, KIND_POLICY_SET, Entry, Position
from audit.store.database import AuditDatabase, describe
from audit.store.models import (
    ROLLUP_DIMENSIONS,
    DecisionHourRow,
    DecisionMinuteRow,
    DecisionRow,
    DryRunFlipRow,
    PolicySetRow,
    SpoolPositionRow,
)

__all__ = [
    "COLUMNS",
    "DAY_US",
    "HOUR_US",
    "MINUTE_US",
    "Batch",
    "StoreWriter",
    "decode_entries",
    "detail_fields",
    "partition_name",
    "rollups",
    "store_errors",
]

log = logging.getLogger(__name__)

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000
MINUTE_US = 60_000_000
# Record fields stored as columns of the same name; time_us is the column ts.
COLUMNS = (
    "decision_id",
    "allowed",
    "reason",
    "engine",
    "status",
    "policy",
    "rule",
    "policy_id",
    "policy_set_version",
    "latency_us",
    "source_principal",
    "source_namespace",
    "source_ip",
    "request_principal",
    "destination_namespace",
    "destination_workload",
    "destination_service",
    "destination_port",
    "sni",
    "method",
    "host",
    "path",
)
_REQUIRED = ("decision_id", "time_us", "allowed", "reason", "engine")
_NOT_DETAIL = frozenset((*COLUMNS, "time_us"))
_EMPTY: tuple[Any, ...] = (None, [], {}, "")
# Partition DDL from several shippers at once is serialized on this advisory lock.
_PARTITION_LOCK = 0x6D657368  # "mesh"


def detail_fields(document: Mapping[str, Any]) -> dict[str, Any]:
    """The record fields kept in ``detail``: everything that is not a column, if set."""
    return {k: v for k, v in document.items() if k not in _NOT_DETAIL and v not in _EMPTY}


@dataclass(slots=True)
class Batch:
    decisions: list[dict[str, Any]] = field(default_factory=list)
    flips: list[dict[str, Any]] = field(default_factory=list)
    policy_sets: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # entries that could not be stored

    @property
    def days(self) -> set[int]:
        return {row["ts"] // DAY_US for row in self.decisions}

    @property
    def oldest_us(self) -> int | None:
        return min((row["ts"] for row in self.decisions), default=None)


def decode_entries(entries: Iterable[Entry]) -> Batch:
    batch = Batch()
    for entry in entries:
        try:
            document = orjson.loads(entry.document)
            if entry.kind == KIND_DECISION:
                _add_decision(batch, document, entry.blob)
            elif entry.kind == KIND_POLICY_SET:
                batch.policy_sets.append(
                    {
                        "version": str(document["version"]),
                        "first_served_us": int(document["time_us"]),
                        "files": orjson.dumps(document["files"]).decode(),
                        "settings": orjson.dumps(document.get("settings") or {}).decode(),
                    }
                )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            # A frame that passed its checksum but does not decode was written by a
            # different meshward: keep shipping, and say so.
            batch.problems.append(f"spool entry ending at {entry.end}: not a record ({exc!r})")
    return batch


def _add_decision(batch: Batch, document: dict[str, Any], blob: bytes) -> None:
    missing = [k for k in _REQUIRED if document.get(k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    row = {name: document.get(name) for name in COLUMNS}
    ts = row["ts"] = int(document["time_us"])
    flips = document.get("dry_run_flips") or []
    row["dry_run_flip"] = bool(flips)
    row["detail"] = orjson.dumps(detail_fields(document)).decode()
    row["request"] = blob or None
    batch.decisions.append(row)
    seen: set[tuple[str, str]] = set()
    for flip in flips:
        key = (str(flip["engine"]), str(flip["policy"]))
        if key not in seen:  # the primary key: one flip per policy and decision
            seen.add(key)
            batch.flips.append(
                {
                    "ts": ts,
                    "decision_id": row["decision_id"],
                    "engine": key[0],
                    "policy": key[1],
                    "to": str(flip["to"]),
                }
            )


def policy_set_files(value: str) -> list[tuple[str, bytes]]:
    """``policy_sets.files`` back to (relative path, contents)."""
    return [(path, base64.b64decode(data)) for path, data in orjson.loads(value)]


def encode_policy_set_files(files: Sequence[tuple[str, bytes]]) -> list[list[str]]:
    return [[path, base64.b64encode(raw).decode()] for path, raw in files]


def partition_name(table: str, day: int) -> str:
    return f"{table}_{datetime.fromtimestamp(day * 86400, UTC):%Y%m%d}"


class StoreWriter:
    """Writes batches into one audit database (the shipper's side of the store)."""

    def __init__(self, db: AuditDatabase) -> None:
        self.db = db
        self._partitioned = db.dialect == "postgresql"
        self._partitions: set[int] = set()
        dialect = postgresql if self._partitioned else sqlite
        self._insert_flips = dialect.insert(DryRunFlipRow.__table__).on_conflict_do_nothing()
        self._insert_sets = dialect.insert(PolicySetRow.__table__).on_conflict_do_nothing()
        position = dialect.insert(SpoolPositionRow.__table__)
        self._upsert_position = position.on_conflict_do_update(
            index_elements=["spool_id"],
            set_={
                "segment": position.excluded.segment,
                "offset": position.excluded.offset,
                "records": position.excluded.records,
                "updated_us": position.excluded.updated_us,
            },
        )

    def position(self, spool_id: str) -> tuple[Position, int] | None:
        """Where ``spool_id`` was shipped to, and how many records so far; None if new."""
        table = SpoolPositionRow.__table__
        with self._errors("reading the spool position"), self.db.engine.connect() as conn:
            row = conn.execute(
                select(table.c.segment, table.c.offset, table.c.records).where(
                    table.c.spool_id == spool_id
                )
            ).first()
        if row is None:
            return None
        return Position(int(row.segment), int(row.offset)), int(row.records)

    def write(self, batch: Batch, *, spool_id: str, position: Position, records: int) -> None:
        """Store ``batch`` and move ``spool_id`` to ``position`` in one transaction."""
        if self._partitioned and batch.decisions:
            self._ensure_partitions(batch.days)
        with self._errors("storing decisions"), self.db.engine.begin() as conn:
            if batch.decisions:
                # What is stored already (a spool shipped again) is neither inserted nor
                # counted. One shipper per spool holds a lock, and decision ids are unique
                # across spools: nothing else can insert these ids meanwhile.
                stored = _stored_ids(conn, batch.decisions)
                new = [r for r in batch.decisions if r["decision_id"] not in stored]
                if new:
                    self._insert(conn, new)
                minutes, hours = rollups(new)
                _add_counts(conn, DecisionMinuteRow.__table__, minutes)
                _add_counts(conn, DecisionHourRow.__table__, hours)
            if batch.flips:
                conn.execute(self._insert_flips, batch.flips)
            if batch.policy_sets:
                conn.execute(self._insert_sets, batch.policy_sets)
            conn.execute(
                self._upsert_position,
                {
                    "spool_id": spool_id,
                    "segment": position.segment,
                    "offset": position.offset,
                    "records": records,
                    "updated_us": time.time_ns() // 1000,
                },
            )

    def _insert(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """The rows, through the driver: SQLAlchemy's per-row parameter handling cost more
        than SQLite's insert itself; PostgreSQL takes them with COPY (there can be no
        conflict: stored ids were left out)."""
        values = [tuple(row[c] for c in _DECISION_COLUMNS) for row in rows]
        if self._partitioned:
            raw = conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cursor, cursor.copy(_COPY_DECISIONS) as copy:
                for value in values:
                    copy.write_row(value)
        else:
            conn.exec_driver_sql(_INSERT_DECISIONS, values)

    def _ensure_partitions(self, days: set[int]) -> None:
        today = time.time_ns() // 1000 // DAY_US
        # Today's and tomorrow's too: the first insert after midnight finds its partition.
        wanted = (days | {today, today + 1}) - self._partitions
        if not wanted:
            return
        # Its own short transaction: partition DDL locks the parent table, and the
        # inserts that follow should not hold that lock.
        with self._errors("creating partitions"), self.db.engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PARTITION_LOCK})
            for day in sorted(wanted):
                for table in ("decisions", "dry_run_flips"):
                    create_partition(conn, table, day)
        self._partitions |= wanted

    def _errors(self, what: str) -> AbstractContextManager[None]:
        return store_errors(self.db, what)


def _stored_ids(conn: Connection, rows: list[dict[str, Any]]) -> set[str]:
    """The decision ids of ``rows`` already stored (at their times).

    Bounded by the batch's times, so that only its partitions (on PostgreSQL) and that
    range of the time index are read: the table may hold billions of other rows.
    """
    first = min(row["ts"] for row in rows)
    last = max(row["ts"] for row in rows)
    ids = [row["decision_id"] for row in rows]
    if conn.dialect.name == "postgresql":
        query = (
            "SELECT decision_id FROM decisions "
            "WHERE ts >= %s AND ts <= %s AND decision_id = ANY(%s)"
        )
        return set(conn.exec_driver_sql(query, (first, last, ids)).scalars())
    found: set[str] = set()
    for start in range(0, len(ids), 900):  # under SQLite's bound-parameter limit
        chunk = ids[start : start + 900]
        marks = ", ".join("?" * len(chunk))
        query = (
            "SELECT decision_id FROM decisions WHERE ts >= ? AND ts <= ? "  # noqa: S608
            f"AND decision_id IN ({marks})"
        )
        found.update(conn.exec_driver_sql(query, (first, last, *chunk)).scalars())
    return found


# The statements below are built from this module's constants and table definitions,
# never from input (hence the noqa: S608).
_DECISION_COLUMNS = tuple(c.name for c in DecisionRow.__table__.columns)
_INSERT_DECISIONS = (
    f"INSERT INTO decisions ({', '.join(_DECISION_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in _DECISION_COLUMNS)}) ON CONFLICT DO NOTHING"
)
_COPY_DECISIONS = f"COPY decisions ({', '.join(_DECISION_COLUMNS)}) FROM STDIN"
_COUNTS_PER_STATEMENT = 500


def _add_counts(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """Add each row's ``count`` to the stored row of its key (or store it): one statement
    per 500 rows, not one per row."""
    if not rows:
        return
    columns = [c.name for c in table.columns]
    key = ", ".join(c.name for c in table.primary_key.columns)
    mark = "%s" if conn.dialect.name == "postgresql" else "?"
    one = f"({', '.join(mark for _ in columns)})"
    for start in range(0, len(rows), _COUNTS_PER_STATEMENT):
        chunk = rows[start : start + _COUNTS_PER_STATEMENT]
        sql = (
            f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "  # noqa: S608
            + ", ".join(one for _ in chunk)
            + f" ON CONFLICT ({key}) DO UPDATE SET count = {table.name}.count + excluded.count"
        )
        conn.exec_driver_sql(sql, tuple(row[c] for row in chunk for c in columns))


def rollups(rows: Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows' counts per minute and outcome, and per hour by ROLLUP_DIMENSIONS, each in
    key order (concurrent shippers lock rollup rows in the same order: no deadlock)."""
    minutes: dict[tuple[int, bool], int] = {}
    hours: dict[tuple[Any, ...], int] = {}
    for row in rows:
        ts, allowed = row["ts"], bool(row["allowed"])
        minute = (ts // MINUTE_US * MINUTE_US, allowed)
        minutes[minute] = minutes.get(minute, 0) + 1
        key = (ts // HOUR_US * HOUR_US, allowed, *(row[d] or "" for d in ROLLUP_DIMENSIONS))
        hours[key] = hours.get(key, 0) + 1
    hour_columns = ("hour_us", "allowed", *ROLLUP_DIMENSIONS)
    return (
        [{"minute_us": m, "allowed": a, "count": n} for (m, a), n in sorted(minutes.items())],
        [
            {**dict(zip(hour_columns, key, strict=True)), "count": n}
            for key, n in sorted(hours.items())
        ],
    )


def create_partition(conn: Connection, table: str, day: int) -> None:
    name = partition_name(table, day)
    conn.execute(
        text(
            f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF {table} '
            f"FOR VALUES FROM ({day * DAY_US}) TO ({(day + 1) * DAY_US})"
        )
    )


@contextmanager
def store_errors(db: AuditDatabase, what: str) -> Iterator[None]:
    """Database failures as StoreError naming the database and what was being done."""
    try:
        yield
    except SQLAlchemyError as exc:
        raise StoreError(f"{what} in {db.display_url} failed: {describe(exc)}") from exc
