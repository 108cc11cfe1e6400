"""The shipper on SQLite and PostgreSQL: exactly once, positions, partitions, retention."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text

from audit.errors import StoreError
from audit.shipper import Shipper, read_status
from audit.spool import KIND_POLICY_SET, SpoolWriter, list_segments
from audit.store.database import AuditDatabase
from audit.store.ingest import DAY_US, encode_policy_set_files, policy_set_files
from audit.store.retention import Retention, enforce_retention
from tests.audit.records import BASE_US, make_record


def stored_ids(db: AuditDatabase) -> list[str]:
    with db.engine.connect() as conn:
        return list(conn.execute(text("SELECT decision_id FROM decisions ORDER BY ts")).scalars())


def test_every_record_is_stored_exactly_once(tmp_path: Path, audit_db: AuditDatabase) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool, segment_bytes=8192)
    for i in range(300):
        assert writer.submit(make_record(i), b"request")
    shipper = Shipper(spool, audit_db, batch_records=64)
    shipper.drain()
    assert stored_ids(audit_db) == [make_record(i).decision_id for i in range(300)]
    assert list_segments(spool) == [list_segments(spool)[-1]]  # shipped segments are gone
    for i in range(300, 310):
        writer.submit(make_record(i))
    shipper.drain()
    assert len(stored_ids(audit_db)) == 310
    writer.close()
    status = read_status(spool)
    assert status is not None
    assert status["shipped"] == 310
    assert status["last_error"] is None


def test_shipping_the_same_spool_again_stores_nothing_twice(
    tmp_path: Path, audit_db: AuditDatabase
) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)  # one segment: the newest is never deleted
    for i in range(50):
        writer.submit(make_record(i))
    Shipper(spool, audit_db).drain()
    with audit_db.engine.begin() as conn:
        conn.execute(text("DELETE FROM spool_positions"))  # as if the position were lost
    Shipper(spool, audit_db).drain()
    assert len(stored_ids(audit_db)) == 50
    writer.close()


def test_a_new_shipper_resumes_from_the_stored_position(
    tmp_path: Path, audit_db: AuditDatabase
) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    for i in range(20):
        writer.submit(make_record(i))
    Shipper(spool, audit_db).drain()
    for i in range(20, 30):
        writer.submit(make_record(i))
    again = Shipper(spool, audit_db)
    assert again.ship_once() == 10
    assert len(stored_ids(audit_db)) == 30
    writer.close()


def test_columns_detail_request_and_flips_are_stored(
    tmp_path: Path, audit_db: AuditDatabase
) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    flips = ({"engine": "istio", "policy": "default.require-trace", "to": "deny"},)
    record = make_record(
        1,
        dry_run={"istio_dry_run_deny_shadow_engine_result": "denied"},
        dry_run_flips=flips,
        audit_policy_ids=("default.audit[rules[0]]",),
        redacted=("header:authorization",),
    )
    writer.submit(record, b"\x0a\x01x")
    files = encode_policy_set_files([("istio/a.yaml", b"kind: AuthorizationPolicy\n")])
    writer.append(
        KIND_POLICY_SET, orjson.dumps({"version": "v1", "time_us": BASE_US, "files": files})
    )
    writer.close()
    Shipper(spool, audit_db).drain()
    with audit_db.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM decisions")).mappings().one()
        flip = conn.execute(text("SELECT * FROM dry_run_flips")).mappings().one()
        stored = conn.execute(text("SELECT files FROM policy_sets")).scalar_one()
    assert row["ts"] == record.time_us
    assert row["source_principal"] == record.source_principal
    assert row["dry_run_flip"]
    assert bytes(row["request"]) == b"\x0a\x01x"
    detail = orjson.loads(row["detail"])
    assert detail["audit_policy_ids"] == ["default.audit[rules[0]]"]
    assert detail["redacted"] == ["header:authorization"]
    assert detail["destination_labels"] == {"app": "reviews", "version": "v1"}
    assert (flip["policy"], flip["to"], flip["decision_id"]) == (
        "default.require-trace",
        "deny",
        record.decision_id,
    )
    assert policy_set_files(stored) == [("istio/a.yaml", b"kind: AuthorizationPolicy\n")]


def test_an_unreachable_database_stops_the_shipper_not_the_spool(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    writer.submit(make_record(1))
    # Nothing listens on port 1: the connection is refused at once.
    down = AuditDatabase("postgresql+psycopg://postgres@127.0.0.1:1/test")
    shipper = Shipper(spool, down)
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1"):
        shipper.ship_once()
    stop = threading.Event()
    thread = threading.Thread(target=shipper.run, args=(stop,))
    thread.start()
    try:
        for _ in range(200):
            status = read_status(spool)
            if status and status["last_error"]:
                break
            stop.wait(0.02)
        assert status
        assert "127.0.0.1:1" in status["last_error"]
    finally:
        stop.set()
        thread.join(10)
    assert writer.submit(make_record(2))  # the writer never noticed
    writer.close()


def test_retention_by_age_and_by_rows(tmp_path: Path, audit_db: AuditDatabase) -> None:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    # 6 decisions a day apart, 10 on the last day.
    for day in range(6):
        writer.submit(make_record(day, time_us=BASE_US + day * DAY_US))
    for i in range(10):
        writer.submit(make_record(100 + i, time_us=BASE_US + 5 * DAY_US + 1 + i))
    writer.close()
    Shipper(spool, audit_db).drain()
    now = BASE_US + 5 * DAY_US + 3600 * 10**6
    enforce_retention(audit_db, Retention(max_age_us=3 * DAY_US, max_rows=None), now_us=now)
    kept = stored_ids(audit_db)
    assert make_record(0).decision_id not in kept
    assert make_record(1).decision_id not in kept
    assert make_record(3).decision_id in kept
    enforce_retention(audit_db, Retention(max_age_us=None, max_rows=10), now_us=now)
    kept = stored_ids(audit_db)
    # Whole hours go on SQLite (the rollups lose exactly what the decisions lose), whole
    # days on PostgreSQL: either way the last day's first decision stays with the 10.
    assert kept == [make_record(5).decision_id] + [
        make_record(100 + i).decision_id for i in range(10)
    ]


@pytest.mark.postgres
def test_postgres_keeps_decisions_in_daily_partitions(tmp_path: Path, postgres_url: str) -> None:
    db = AuditDatabase(postgres_url)
    db.migrate()
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    for day in range(3):
        writer.submit(make_record(day, time_us=BASE_US + day * DAY_US))
    writer.close()
    Shipper(spool, db).drain()
    with db.engine.connect() as conn:
        parts = set(
            conn.execute(
                text(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'decisions'"
                )
            ).scalars()
        )
    assert {"decisions_20270101", "decisions_20270102", "decisions_20270103"} <= parts
    result = enforce_retention(
        db, Retention(max_age_us=DAY_US, max_rows=None), now_us=BASE_US + 2 * DAY_US + 1
    )
    # (Partitions for the real today and tomorrow exist too, and are older than this "now".)
    assert "decisions_20270101" in result.dropped_partitions
    assert "decisions_20270102" not in result.dropped_partitions
    assert stored_ids(db) == [make_record(1).decision_id, make_record(2).decision_id]
    db.dispose()
