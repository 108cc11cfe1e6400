"""The rollups answer exactly what a scan of decisions answers, on both backends.

Aggregates over long spans read decision_minutes / decision_hours; each case here is
asked twice, once with the rollups and once scanning decisions over the span the
rollup answer says it covers, and the two must agree row for row, before and after
retention, and after the same spool is shipped twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from audit.record import DecisionRecord
from audit.shipper import Shipper
from audit.spool import SpoolWriter
from audit.store.database import AuditDatabase
from audit.store.ingest import HOUR_US
from audit.store.queries import Filters, edges, series, top
from audit.store.retention import Retention, enforce_retention
from tests.audit.records import BASE_US, make_record

HOURS = 30


def spread(n: int) -> DecisionRecord:
    """Decisions every 7 minutes over 30 hours, callers and outcomes cycling."""
    caller = n % 5
    workload = ("reviews", "ratings", "details")[(n + caller) % 3]
    allowed = (n * 7 + caller) % 4 != 0
    policy = f"default.{workload}-policy" if allowed else "istio-system.deny-debug"
    return make_record(
        n,
        time_us=BASE_US + n * 7 * 60_000_000 + 12_345,
        allowed=allowed,
        reason="allowed_by_policy" if allowed else "denied_by_policy",
        engine="rego" if n % 11 == 0 else "istio",
        policy=policy,
        rule=n % 2,
        policy_id=f"{policy}[rules[{n % 2}]]",
        source_principal=None if n % 13 == 0 else f"example.org/ns/ns{caller % 2}/sa/c{caller}",
        source_namespace=None if n % 13 == 0 else f"ns{caller % 2}",
        destination_namespace="default" if n % 17 else None,
        destination_workload=workload,
    )


RECORDS = [spread(n) for n in range(HOURS * 60 // 7)]
CASES: list[dict[str, Any]] = [
    {},
    {"allowed": False},
    {"allowed": True, "engine": "istio"},
    {"principal": "example.org/ns/ns1/sa/c3"},
    {"principal_prefix": "example.org/ns/ns0/"},
    {"source_namespace": "ns1", "workload": "ratings"},
    {"namespace": "default", "reason": "denied_by_policy"},
    {"policy": "default.reviews-policy", "rule": 1},
]
SPANS = [
    (BASE_US, BASE_US + HOURS * HOUR_US),  # aligned
    (BASE_US + 5 * 60_000_000 + 7, BASE_US + 20 * HOUR_US - 3),  # widened to hours
    (BASE_US + 2 * HOUR_US, None),  # open-ended
]


@pytest.fixture
def shipped(tmp_path: Path, audit_db: AuditDatabase) -> AuditDatabase:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    for record in RECORDS:
        writer.submit(record)
    writer.close()
    Shipper(spool, audit_db, batch_records=50).drain()
    return audit_db


def compare(db: AuditDatabase, *, now_us: int) -> int:
    """Every case with and without rollups; how many the rollups answered."""
    answered = 0
    with db.engine.connect() as conn:
        for since, until in SPANS:
            for case in CASES:
                asked = Filters(since_us=since, until_us=until, **case)
                for run in (
                    lambda f, r: top(conn, f, by="principal", now_us=now_us, rollups=r),
                    lambda f, r: top(conn, f, by="rule", now_us=now_us, rollups=r),
                    lambda f, r: top(conn, f, by="workload", limit=2, now_us=now_us, rollups=r),
                    lambda f, r: edges(conn, f, now_us=now_us, rollups=r),
                    lambda f, r: series(conn, f, bucket_s=3600, rollups=r),
                ):
                    fast = run(asked, True)
                    covered = Filters(
                        **{**case, "since_us": fast.since_us, "until_us": fast.until_us}
                    )
                    slow = run(covered, False)
                    assert slow.source == "decisions"
                    assert fast.rows == slow.rows, (case, since, until, fast.source)
                    answered += fast.source != "decisions"
    return answered


def test_rollups_agree_with_a_scan(shipped: AuditDatabase) -> None:
    now = BASE_US + HOURS * HOUR_US
    answered = compare(shipped, now_us=now)
    assert answered > len(SPANS) * len(CASES)  # the rollups did answer most of them


def test_shipping_a_spool_twice_counts_nothing_twice(
    tmp_path: Path, shipped: AuditDatabase
) -> None:
    with shipped.engine.begin() as conn:
        conn.execute(text("DELETE FROM spool_positions"))
    Shipper(tmp_path / "spool", shipped).drain()
    with shipped.engine.connect() as conn:
        minutes = conn.execute(text("SELECT sum(count) FROM decision_minutes")).scalar()
        hours = conn.execute(text("SELECT sum(count) FROM decision_hours")).scalar()
    assert minutes == hours == len(RECORDS)
    compare(shipped, now_us=BASE_US + HOURS * HOUR_US)


def test_retention_keeps_the_rollups_exact(shipped: AuditDatabase) -> None:
    now = BASE_US + HOURS * HOUR_US
    # SQLite deletes whole hours; PostgreSQL drops whole days (the first of the two).
    age = 20 * HOUR_US + 1 if shipped.is_sqlite else 5 * HOUR_US
    enforce_retention(shipped, Retention(max_age_us=age, max_rows=None), now_us=now)
    with shipped.engine.connect() as conn:
        left = conn.execute(text("SELECT count(*) FROM decisions")).scalar()
        minutes = conn.execute(text("SELECT sum(count) FROM decision_minutes")).scalar()
        hours = conn.execute(text("SELECT sum(count) FROM decision_hours")).scalar()
    assert 0 < left < len(RECORDS)
    assert minutes == hours == left
    compare(shipped, now_us=now)
