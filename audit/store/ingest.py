"""Spool entries → rows, and the one transaction that stores a batch with its position.

The batch's rows, its policy sets and the spool's new position are committed
together: after a crash on either side the shipper resumes exactly where the store
says it stopped. Inserts also ignore a ``decision_id`` already stored (at its time),
so a spool shipped twice, or copied, still stores each decision once.
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
from audit.store.models import DecisionRow, DryRunFlipRow, PolicySetRow, SpoolPositionRow

__all__ = [
    "COLUMNS",
    "DAY_US",
    "Batch",
    "StoreWriter",
    "decode_entries",
    "detail_fields",
    "partition_name",
    "store_errors",
]

log = logging.getLogger(__name__)

DAY_US = 86_400_000_000
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
        self._insert_decisions = dialect.insert(DecisionRow.__table__).on_conflict_do_nothing()
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
                conn.execute(self._insert_decisions, batch.decisions)
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
