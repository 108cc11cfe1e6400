"""The audit trail's costs and speeds, measured in one run on this machine.

1. What recording costs a Check call: ``decide()`` on the sample policies/ with the
   spool (request snapshot, redaction, frame, write(2)) against ``decide()`` into a sink
   that keeps nothing, in ``--rounds`` short rounds of each in random order; the median
   of the rounds' differences next to the decision itself (target: < 10 %).
2. Ingest: decisions per second from ``submit`` to committed rows, through the real
   shipper process (``meshward audit ship``), on SQLite and PostgreSQL (target on
   SQLite: >= 20,000/s).
3. Queries on a full store: 1M decisions on SQLite, 10M on PostgreSQL (generated with
   the shape of a mesh: 400 principals, 60 workloads, 30 policies, a third denied, 1 %
   flipped by a dry-run policy, over 24 h): the filtered list (first and a deep page),
   the per-minute series over 24 h, the top-N tables, edges, dry-run; p50 and p95 of
   ``--repeat`` runs each (target p95 <= 200 ms on SQLite at 1M).
4. Replay: recorded decisions re-evaluated per second against a candidate set.

    .venv/bin/python bench/audit_trail.py [--rows 1000000] [--pg-rows 10000000] [--no-pg]
                                          [--cost-only]
"""

from __future__ import annotations

import sys
from pathlib import Path

# tests.audit.decided makes the recorded decisions replay uses: the repository root.
sys.path.insert(0, str(Path(__file__).parents[1]))

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from audit.record import DecisionRecord
from audit.redaction import Redaction
from audit.spool import Position, SpoolWriter
from audit.store.database import AuditDatabase
from audit.store.ingest import DAY_US, Batch, StoreWriter
from audit.store.queries import (
    Aggregate,
    Filters,
    dry_run_policies,
    edges,
    list_decisions,
    series,
    top,
)
from meshward.audit_tools import replay_decisions
from meshward.authz_runtime import build_authz
from meshward.config import load_config
from tests.audit.decided import REQUESTS, decide_into_store, request

ROOT = Path(__file__).parents[1]
POLICIES = ROOT / "policies"
PG_ADMIN = os.environ.get("PG_TEST_URL", "postgresql://postgres@127.0.0.1:5432/test")


class NullSink:
    def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
        return True


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def check_cost(calls: int, rounds: int) -> None:
    print("-- what recording costs a Check call (sample policies/, decide() in process) --")
    config = load_config(None, env={}, flags={"trust_domain": "example.org"})
    checks = {
        "reviews GET, traceparent, bearer token": request(
            "frontend",
            "GET",
            "/reviews/1?page=2",
            "reviews",
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            authorization="Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl",
            **{"user-agent": "curl/8.5", "accept": "*/*"},
        ),
        "ratings DELETE, denied": request("reviews", "DELETE", "/ratings/1", "ratings"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        spool = SpoolWriter(Path(tmp) / "spool", max_bytes=1 << 40)
        bare = build_authz(config, policies=POLICIES, sink=NullSink(), registry=CollectorRegistry())
        kept = build_authz(
            config,
            policies=POLICIES,
            sink=spool,
            registry=CollectorRegistry(),
            redaction=Redaction.build(os.urandom(32)),
        )
        arms = {"bare": bare[1], "kept": kept[1]}
        for store, _ in (bare, kept):
            store.reload()
        for name, check in checks.items():
            for servicer in arms.values():
                per_call_us(lambda c=check, s=servicer: s.decide(c), 200)  # warm
            # Many short rounds, the two arms in random order in each: what else runs on
            # the machine lands on both alike, and each round's difference pairs them
            # (with 7 long rounds, the ratio moved by up to 25 points between runs here).
            times: dict[str, list[float]] = {arm: [] for arm in arms}
            for _ in range(rounds):
                for arm in random.sample(list(arms), len(arms)):
                    servicer = arms[arm]
                    times[arm].append(per_call_us(lambda c=check, s=servicer: s.decide(c), calls))
            decision = statistics.median(times["bare"])
            extra = [k - b for k, b in zip(times["kept"], times["bare"], strict=True)]
            low, median, high = statistics.quantiles(extra, n=4)
            print(
                f"  {name:<40} decision {decision:6.1f} µs; recording adds {median:5.1f} µs "
                f"(interquartile {low:.1f} to {high:.1f}) = {median / decision:.1%} "
                "(target < 10 %)"
            )
        spool.close()


def ingest(url: str, label: str, count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        config = data / "config.yaml"
        config.write_text(f"audit:\n  database_url: {url}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHWARD_")}
        shipper = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward",
                "audit",
                "ship",
                "--data-dir",
                tmp,
                "--config",
                str(config),
                "--log-level",
                "warning",
            ],
            env=env,
        )
        try:
            spool_dir = data / "audit" / "spool"
            deadline = time.monotonic() + 60
            while not (spool_dir / "shipper.json").exists():
                assert time.monotonic() < deadline, "the shipper did not start"
                assert shipper.poll() is None, "the shipper exited"
                time.sleep(0.05)
            writer = SpoolWriter(spool_dir, max_bytes=1 << 40)
            blob = request("frontend", "GET", "/reviews/1", "reviews").SerializeToString()
            template = _record(0)
            started = time.perf_counter()
            for i in range(count):
                writer.submit(_replace_id(template, i), blob)
            submitted = time.perf_counter() - started
            db = AuditDatabase(url, read_only=True)
            while _count(db) < count:
                time.sleep(0.01)
            total = time.perf_counter() - started
            db.dispose()
            writer.close()
        finally:
            shipper.terminate()
            shipper.wait(60)
    print(
        f"  {label:<11} {count:,} decisions: submit {count / submitted:9,.0f}/s, "
        f"submit → committed {count / total:8,.0f}/s"
        + ("  (target >= 20,000/s)" if label == "SQLite" else "")
    )


def _count(db: AuditDatabase) -> int:
    try:
        with db.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM decisions")).scalar() or 0)
    except Exception:
        return 0  # not migrated yet


def _record(i: int) -> DecisionRecord:
    return DecisionRecord(
        decision_id=uuid.uuid4().hex,
        time_us=time.time_ns() // 1000,
        allowed=i % 3 != 0,
        reason="allowed_by_policy",
        engine="istio",
        policy="default.reviews-viewer",
        rule=0,
        policy_id="default.reviews-viewer[rules[0]]",
        policy_set_version="b804062d88779ab6",
        latency_us=45,
        source_principal="example.org/ns/default/sa/frontend",
        source_namespace="default",
        source_ip="10.0.0.2",
        destination_namespace="default",
        destination_workload="reviews",
        destination_service="reviews",
        destination_labels={"app": "reviews", "version": "v1"},
        destination_port=9080,
        method="GET",
        host="reviews",
        path="/reviews/1",
        dry_run={"istio_dry_run_deny_shadow_engine_result": "allowed"},
    )


def _replace_id(record: DecisionRecord, i: int) -> DecisionRecord:
    from dataclasses import replace

    return replace(record, decision_id=f"{i:032x}", time_us=time.time_ns() // 1000)


# -- a full store -------------------------------------------------------------------------

PRINCIPALS = 400
WORKLOADS = 60
POLICY_NAMES = 30


def fill(db: AuditDatabase, rows: int, now_us: int) -> None:
    """``rows`` decisions over the 24 h before ``now_us``, stored as the shipper stores
    them (rollups included), in batches of 20,000.

    A mesh's shape: each of 400 callers calls two of 60 workloads; the policy and rule
    that decide follow from the workload and the method, the outcome from the caller,
    the workload and the method (a third of the pairs are denied); paths vary.
    """
    writer = StoreWriter(db)
    blob = request("frontend", "GET", "/reviews/1", "reviews").SerializeToString()
    detail = orjson.dumps({"destination_labels": {"app": "w"}}).decode()
    batch = Batch()
    for i in range(rows):
        h = (i * 2654435761) % 4294967296  # a cheap scramble: values not in row order
        caller = h % PRINCIPALS
        w = caller % WORKLOADS if h & 1 else (caller * 7 + 3) % WORKLOADS
        method = (h >> 3) % 3
        allowed = (caller + w + method) % 3 != 0
        namespace = f"ns{w % 7}"
        policy = f"{namespace}.policy-{w % POLICY_NAMES}"
        ts = now_us - DAY_US + (i * DAY_US) // rows
        decision_id = f"{i:032x}"
        batch.decisions.append(
            {
                "ts": ts,
                "decision_id": decision_id,
                "allowed": allowed,
                "reason": "allowed_by_policy" if allowed else "denied_by_policy",
                "engine": "istio",
                "status": None if allowed else 403,
                "policy": policy,
                "rule": method,
                "policy_id": f"{policy}[rules[{method}]]",
                "policy_set_version": "v1",
                "latency_us": 40 + h % 30,
                "source_principal": f"example.org/ns/ns{caller % 7}/sa/svc{caller}",
                "source_namespace": f"ns{caller % 7}",
                "source_ip": "10.0.0.2",
                "request_principal": None,
                "destination_namespace": namespace,
                "destination_workload": f"w{w}",
                "destination_service": f"w{w}",
                "destination_port": 8080,
                "sni": None,
                "method": ("GET", "POST", "DELETE")[method],
                "host": f"w{w}",
                "path": f"/api/v{h % 3}/items/{(h >> 5) % 1000}",
                "dry_run_flip": h % 100 == 0,
                "detail": detail,
                "request": blob,
            }
        )
        if h % 100 == 0:
            batch.flips.append(
                {
                    "ts": ts,
                    "decision_id": decision_id,
                    "engine": "istio",
                    "policy": f"default.staged-{h % 5}",
                    "to": "deny",
                }
            )
        if len(batch.decisions) == 20_000 or i == rows - 1:
            writer.write(batch, spool_id="bench", position=Position(1, i), records=i + 1)
            batch = Batch()
            if (i + 1) % 1_000_000 == 0:
                print(f"    {i + 1:,} rows", flush=True)
    with db.engine.begin() as conn:
        conn.execute(text("ANALYZE"))


QUERIES: dict[str, Callable[[Any, int], object]] = {
    "list, newest 50": lambda c, now: list_decisions(c, Filters(since_us=now - DAY_US)),
    "list, denied": lambda c, now: list_decisions(c, Filters(since_us=now - DAY_US, allowed=False)),
    "list, one principal": lambda c, now: list_decisions(
        c, Filters(principal="example.org/ns/ns3/sa/svc17")
    ),
    "list, workload + denied": lambda c, now: list_decisions(
        c, Filters(namespace="ns3", workload="w10", allowed=False)
    ),
    "list, path prefix": lambda c, now: list_decisions(
        c, Filters(since_us=now - DAY_US, path_prefix="/api/v2/items/99")
    ),
    "list, dry-run flips": lambda c, now: list_decisions(c, Filters(dry_run_flip=True)),
    "list, page 100 (cursor)": lambda c, now: _deep_page(c, now),
    "series per minute, 24 h": lambda c, now: series(
        c, Filters(since_us=now - DAY_US), bucket_s=60
    ),
    "series per minute, denied": lambda c, now: series(
        c, Filters(since_us=now - DAY_US, allowed=False), bucket_s=60
    ),
    "top denied principals": lambda c, now: top(
        c, Filters(since_us=now - DAY_US, allowed=False), by="principal"
    ),
    "top denying policies": lambda c, now: top(
        c, Filters(since_us=now - DAY_US, allowed=False), by="policy"
    ),
    "top denying rules": lambda c, now: top(
        c, Filters(since_us=now - DAY_US, allowed=False), by="rule"
    ),
    "edges": lambda c, now: edges(c, Filters(since_us=now - DAY_US)),
    "dry-run policies": lambda c, now: dry_run_policies(c, Filters(since_us=now - DAY_US)),
}
_CURSORS: dict[int, str] = {}


def _deep_page(conn: Any, now: int) -> object:
    cursor = _CURSORS.get(now)
    if cursor is None:
        page = None
        for _ in range(100):
            page = list_decisions(conn, Filters(since_us=now - DAY_US), cursor=cursor)
            cursor = page.next_cursor
        assert cursor is not None
        _CURSORS[now] = cursor
    return list_decisions(conn, Filters(since_us=now - DAY_US), cursor=cursor)


def queries(db: AuditDatabase, label: str, rows: int, now: int, repeat: int) -> None:
    print(f"  {label}, {rows:,} decisions: p50 / p95 of {repeat} runs")
    worst = 0.0
    reader = AuditDatabase(db.engine.url.render_as_string(hide_password=False), read_only=True)
    with reader.engine.connect() as conn:
        for name, query in QUERIES.items():
            query(conn, now)  # warm the cache, as a dashboard that refreshes has it
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                query(conn, now)
                times.append((time.perf_counter() - started) * 1000)
            times.sort()
            p95 = times[min(len(times) - 1, int(len(times) * 0.95))]
            worst = max(worst, p95)
            answer = query(conn, now)
            source = f"  ({answer.source})" if isinstance(answer, Aggregate) else ""
            print(f"    {name:<28} {statistics.median(times):7.1f} ms  {p95:7.1f} ms{source}")
    reader.dispose()
    target = "  (target <= 200 ms on SQLite at 1M)" if label == "SQLite" else ""
    print(f"    worst p95 {worst:.1f} ms{target}")


def replay(seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        recorded = REQUESTS * 25
        decide_into_store(POLICIES, data, recorded)
        candidate = Path(tmp) / "candidate"
        shutil.copytree(POLICIES, candidate)
        ratings = candidate / "istio" / "ratings.yaml"
        ratings.write_text(ratings.read_text().replace("sa/reviews", "sa/nobody"))
        db = AuditDatabase(f"sqlite:///{data / 'audit' / 'audit.db'}", read_only=True)
        from audit.store.queries import iter_decisions

        with db.engine.connect() as conn:
            items = list(iter_decisions(conn, Filters(), with_request=True))
        db.dispose()
        config = load_config(None, env={}, flags={"trust_domain": "example.org"})
        started = time.perf_counter()
        rounds = 0
        while time.perf_counter() - started < seconds:
            report = replay_decisions(config, candidate, items)
            rounds += 1
        elapsed = time.perf_counter() - started
        rate = rounds * len(items) / elapsed
        print(
            f"-- replay: {rate:,.0f} recorded decisions re-evaluated/s (sample policies, "
            f"{report['flips']['allow_to_deny']} of {len(items)} flip; loading the candidate "
            "included) --"
        )


def postgres_url() -> tuple[str, Callable[[], None]]:
    name = f"meshward_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def drop() -> None:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return f"{base}/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="per cost measurement round")
    parser.add_argument("--rounds", type=int, default=141, help="cost measurement rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="of replay")
    parser.add_argument("--ingest", type=int, default=200_000, help="decisions shipped")
    parser.add_argument("--rows", type=int, default=1_000_000, help="stored decisions (SQLite)")
    parser.add_argument("--pg-rows", type=int, default=10_000_000, help="stored (PostgreSQL)")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--cost-only", action="store_true", help="only 1., the recording cost")
    args = parser.parse_args()

    check_cost(args.calls, args.rounds)
    if args.cost_only:
        return
    print(f"-- ingest through the shipper process ({args.ingest:,} decisions) --")
    with tempfile.TemporaryDirectory() as tmp:
        ingest(f"sqlite:///{tmp}/audit.db", "SQLite", args.ingest)
    if not args.no_pg:
        url, drop = postgres_url()
        try:
            ingest(url, "PostgreSQL", args.ingest)
        finally:
            drop()
    print("-- queries on a full store --")
    now = time.time_ns() // 1000
    with tempfile.TemporaryDirectory() as tmp:
        db = AuditDatabase(f"sqlite:///{tmp}/audit.db")
        db.migrate()
        started = time.perf_counter()
        fill(db, args.rows, now)
        print(f"    filled in {time.perf_counter() - started:.0f} s")
        queries(db, "SQLite", args.rows, now, args.repeat)
        db.dispose()
    if not args.no_pg:
        url, drop = postgres_url()
        try:
            db = AuditDatabase(url)
            db.migrate()
            started = time.perf_counter()
            fill(db, args.pg_rows, now)
            print(f"    filled in {time.perf_counter() - started:.0f} s")
            queries(db, "PostgreSQL", args.pg_rows, now, args.repeat)
            db.dispose()
        finally:
            drop()
    replay(args.seconds)


if __name__ == "__main__":
    main()
