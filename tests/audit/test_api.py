"""The query API on a fixture of known decisions, on SQLite and PostgreSQL.

Every filter and aggregate is compared with the same question answered in Python over
the fixture, so a filter that is ignored, inverted or off by one shows.
"""

from __future__ import annotations

import base64
import csv
import io
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from audit.api import create_audit_app
from audit.record import DecisionRecord
from audit.shipper import Shipper
from audit.spool import SpoolWriter
from audit.store.database import AuditDatabase
from audit.timespec import format_time
from tests.asgi_client import TestClient
from tests.audit.records import BASE_US, make_record

N = 60
SINCE = format_time(BASE_US)
UNTIL = format_time(BASE_US + N * 60_000_000)
SPAN = {"since": SINCE, "until": UNTIL}


def fixture_record(n: int) -> DecisionRecord:
    allowed = n % 3 != 0
    rego = n % 5 == 0
    reviews = n % 2 == 0
    workload = "reviews" if reviews else "ratings"
    policy = (
        ("default.reviews-viewer" if reviews else "default.ratings-reader")
        if allowed
        else ("data.envoy.authz.allow" if rego else "istio-system.deny-debug")
    )
    rule = None if policy.startswith("data.") else n % 2
    flips: tuple[dict[str, str], ...] = ()
    if n % 7 == 0:
        flips = ({"engine": "istio", "policy": "default.require-trace", "to": "deny"},)
    if n % 11 == 0:
        flips += ({"engine": "rego", "policy": "envoy.authz.mfa", "to": "allow"},)
    return make_record(
        n,
        allowed=allowed,
        engine="rego" if rego else "istio",
        reason="allowed_by_policy" if allowed else ("denied" if rego else "denied_by_policy"),
        status=None if allowed else (401 if rego else 403),
        policy=policy,
        rule=rule,
        policy_id=policy if rule is None else f"{policy}[rules[{rule}]]",
        source_namespace="other" if n % 4 == 3 else "default",
        source_principal=f"example.org/ns/{'other' if n % 4 == 3 else 'default'}/sa/client{n % 4}",
        destination_workload=workload,
        destination_service=workload,
        method=("GET", "POST", "DELETE")[n % 3],
        path=f"/{workload}/{n}",
        dry_run_flips=flips,
        policy_set_version="v1" if n < N // 2 else "v2",
    )


RECORDS = [fixture_record(n) for n in range(N)]


@pytest.fixture
def client(tmp_path: Path, audit_db: AuditDatabase) -> Iterator[TestClient]:
    spool = tmp_path / "spool"
    writer = SpoolWriter(spool)
    for n, record in enumerate(RECORDS):
        writer.submit(record, f"request {n}".encode() if n % 2 else None)
    writer.close()
    Shipper(spool, audit_db).drain()
    reader = AuditDatabase(
        audit_db.engine.url.render_as_string(hide_password=False), read_only=True
    )
    app = create_audit_app(reader, registry=CollectorRegistry())
    with TestClient(app) as test_client:
        yield test_client
    reader.dispose()


def ids(records: list[DecisionRecord]) -> list[str]:
    """Newest first, as lists are."""
    return [r.decision_id for r in sorted(records, key=lambda r: r.time_us, reverse=True)]


def listed(client: TestClient, **params: Any) -> list[str]:
    found: list[str] = []
    cursor = None
    while True:
        query = {**SPAN, **params, "limit": 7}
        if cursor:
            query["cursor"] = cursor
        response = client.get("/v1/decisions", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        found += [item["decision_id"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return found


FILTER_CASES: list[tuple[dict[str, str], Callable[[DecisionRecord], bool]]] = [
    ({}, lambda r: True),
    ({"allowed": "true"}, lambda r: r.allowed),
    ({"allowed": "false"}, lambda r: not r.allowed),
    ({"engine": "rego"}, lambda r: r.engine == "rego"),
    ({"reason": "denied_by_policy"}, lambda r: r.reason == "denied_by_policy"),
    ({"policy": "default.reviews-viewer"}, lambda r: r.policy == "default.reviews-viewer"),
    (
        {"policy": "default.ratings-reader", "rule": "1"},
        lambda r: r.policy == "default.ratings-reader" and r.rule == 1,
    ),
    (
        {"principal": "example.org/ns/default/sa/client1"},
        lambda r: r.source_principal == "example.org/ns/default/sa/client1",
    ),
    (
        {"principal_prefix": "example.org/ns/other/"},
        lambda r: (r.source_principal or "").startswith("example.org/ns/other/"),
    ),
    ({"source_namespace": "other"}, lambda r: r.source_namespace == "other"),
    ({"namespace": "default"}, lambda r: r.destination_namespace == "default"),
    ({"workload": "ratings"}, lambda r: r.destination_workload == "ratings"),
    ({"service": "reviews"}, lambda r: r.destination_service == "reviews"),
    ({"method": "DELETE"}, lambda r: r.method == "DELETE"),
    ({"path_prefix": "/ratings/1"}, lambda r: (r.path or "").startswith("/ratings/1")),
    ({"status": "401"}, lambda r: r.status == 401),
    ({"dry_run_flip": "true"}, lambda r: bool(r.dry_run_flips)),
    ({"decision_id": RECORDS[17].decision_id}, lambda r: r is RECORDS[17]),
    ({"version": "v2"}, lambda r: r.policy_set_version == "v2"),
    (
        {"since": format_time(RECORDS[10].time_us), "until": format_time(RECORDS[20].time_us)},
        lambda r: RECORDS[10].time_us <= r.time_us < RECORDS[20].time_us,
    ),
    (
        {"allowed": "false", "workload": "reviews", "source_namespace": "default"},
        lambda r: (
            not r.allowed
            and r.destination_workload == "reviews"
            and r.source_namespace == "default"
        ),
    ),
]


@pytest.mark.parametrize(
    ("params", "expected"),
    FILTER_CASES,
    ids=["&".join(f"{k}={v}" for k, v in p.items()) or "none" for p, _ in FILTER_CASES],
)
def test_every_filter_and_pagination(
    client: TestClient, params: dict[str, str], expected: Callable[[DecisionRecord], bool]
) -> None:
    want = ids([r for r in RECORDS if expected(r)])
    assert want, "a case must select something"
    assert listed(client, **params) == want


def test_oldest_first_follows_from_a_cursor(client: TestClient) -> None:
    body = client.get("/v1/decisions", params={**SPAN, "order": "oldest", "limit": 5}).json()
    assert [i["decision_id"] for i in body["items"]] == [r.decision_id for r in RECORDS[:5]]
    after = client.get(
        "/v1/decisions", params={**SPAN, "order": "oldest", "cursor": body["next_cursor"]}
    ).json()
    assert after["items"][0]["decision_id"] == RECORDS[5].decision_id


def test_a_decision_has_every_field_and_its_request(client: TestClient) -> None:
    record = RECORDS[7]
    body = client.get(f"/v1/decisions/{record.decision_id}").json()
    assert body["dry_run_flips"] == [dict(f) for f in record.dry_run_flips]
    assert body["destination_labels"] == {"app": "reviews", "version": "v1"}
    assert body["time_us"] == record.time_us
    assert body["time"] == format_time(record.time_us)
    assert body["request"] == {"error": "the stored request snapshot does not decode"}
    assert client.get(f"/v1/decisions/{RECORDS[8].decision_id}").json()["request"] is None
    missing = client.get("/v1/decisions/nope")
    assert missing.status_code == 404
    assert "no decision nope" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"allowed": "maybe"}, "allowed"),
        ({"since": "yesterday"}, "since"),
        ({"rule": "first"}, "rule"),
        ({"principle": "x"}, "principle"),
        ({"cursor": "!!"}, "cursor"),
    ],
)
def test_bad_parameters_are_a_400_naming_them(
    client: TestClient, params: dict[str, str], field: str
) -> None:
    response = client.get("/v1/decisions", params=params)
    assert response.status_code == 400, response.text
    assert response.json()["field"] == field
    assert field in response.json()["error"]


def test_per_minute_series(client: TestClient) -> None:
    body = client.get("/v1/aggregates/series", params={**SPAN, "bucket": 600}).json()
    expected: Counter[tuple[int, bool]] = Counter()
    for r in RECORDS:
        expected[(r.time_us // 600_000_000 * 600_000_000, r.allowed)] += 1
    got = {(p["time_us"], True): p["allowed"] for p in body["points"]} | {
        (p["time_us"], False): p["denied"] for p in body["points"]
    }
    assert {k: v for k, v in got.items() if v} == dict(expected)
    assert sum(p["allowed"] + p["denied"] for p in body["points"]) == N


@pytest.mark.parametrize(
    ("by", "field", "params"),
    [
        ("principal", "source_principal", {"allowed": "false"}),
        ("policy", "policy", {"allowed": "false"}),
        ("rule", "policy_id", {}),
        ("reason", "reason", {}),
        ("workload", "destination_workload", {"method": "GET"}),
    ],
)
def test_top_values(client: TestClient, by: str, field: str, params: dict[str, str]) -> None:
    body = client.get("/v1/aggregates/top", params={**SPAN, **params, "by": by, "limit": 3}).json()
    selected = [
        r
        for r in RECORDS
        if all(
            {"allowed": str(r.allowed).lower(), "method": r.method}[k] == v
            for k, v in params.items()
        )
    ]
    counts = Counter(getattr(r, field) for r in selected)
    want = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    assert [(row["value"], row["count"]) for row in body["rows"]] == want
    for row in body["rows"]:
        mine = [r for r in selected if getattr(r, field) == row["value"]]
        assert row["denied"] == sum(not r.allowed for r in mine)


def test_edges(client: TestClient) -> None:
    body = client.get("/v1/aggregates/edges", params=SPAN).json()
    expected: Counter[tuple[str | None, str | None, bool]] = Counter(
        (r.source_principal, r.destination_workload, r.allowed) for r in RECORDS
    )
    got = Counter[tuple[str | None, str | None, bool]]()
    for edge in body["edges"]:
        assert edge["namespace"] == "default"
        got[(edge["source"], edge["workload"], True)] += edge["allowed"]
        got[(edge["source"], edge["workload"], False)] += edge["denied"]
    assert +got == expected


def test_dry_run_policies(client: TestClient) -> None:
    body = client.get("/v1/aggregates/dry-run", params=SPAN).json()
    expected = Counter(
        (f["engine"], f["policy"], f["to"]) for r in RECORDS for f in r.dry_run_flips
    )
    assert {(p["engine"], p["policy"], p["to"]): p["count"] for p in body["policies"]} == expected
    trace = next(p for p in body["policies"] if p["policy"] == "default.require-trace")
    newest = ids(
        [r for r in RECORDS if r.dry_run_flips and r.dry_run_flips[0]["engine"] == "istio"]
    )
    assert trace["examples"] == newest[:3]
    narrowed = client.get("/v1/aggregates/dry-run", params={**SPAN, "allowed": "false"}).json()[
        "policies"
    ]
    assert sum(p["count"] for p in narrowed) == sum(
        len(r.dry_run_flips) for r in RECORDS if not r.allowed
    )


def test_exports(client: TestClient) -> None:
    params = {**SPAN, "allowed": "false"}
    denied = ids([r for r in RECORDS if not r.allowed])
    jsonl = client.get("/v1/decisions/export", params={**params, "include_request": "true"})
    assert jsonl.status_code == 200
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    lines = [orjson.loads(line) for line in jsonl.content.splitlines()]
    assert [item["decision_id"] for item in lines] == denied
    by_id = {item["decision_id"]: item for item in lines}
    odd = next(r for r in RECORDS if not r.allowed and RECORDS.index(r) % 2)
    assert (
        base64.b64decode(by_id[odd.decision_id]["request"])
        == f"request {RECORDS.index(odd)}".encode()
    )
    exported = client.get("/v1/decisions/export", params={**params, "format": "csv"})
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [row["decision_id"] for row in rows] == denied
    assert rows[0]["allowed"] == "False"


def test_the_openapi_document_lists_every_filter(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    names = {p["name"] for p in spec["paths"]["/v1/decisions"]["get"]["parameters"]}
    assert {"since", "principal_prefix", "dry_run_flip", "cursor", "limit"} <= names


def test_no_endpoint_writes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    methods = {m for path in spec["paths"].values() for m in path}
    assert methods == {"get"}
