"""Replay counts what it cannot re-evaluate instead of guessing.

Decisions are made by the real servicer on a recorded policy set, redacted and shipped
into the store as `meshward authz` does; each candidate differs from the recorded set
only in reading one thing the trail does not keep. Every recorded request was allowed
and every candidate would deny the requests whose value it cannot see had it been
given the ``redacted:`` hash (or no body) instead: a replay that guessed would report
them as flips (or, for the path, as unchanged), and the counts below would not hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2

from audit.store.database import sqlite_url
from authz.request_test_file import Destination, RequestUnderTest
from authz.request_tests import build_check_request
from meshward.audit_tools import replay_decisions
from tests.audit.decided import config_for, decide_into_store, replay_store

API_ISTIO = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-rego, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: CUSTOM
  provider: {name: rego}
  rules: [{to: [{operation: {paths: ["/api/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-callers, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/frontend"]}}]
"""
ALLOW_ALL = "package envoy.authz\n\ndefault allow := true\n"

# The recorded requests, two of each: what the trail redacts of them, if anything.
SENT: dict[str, dict[str, Any]] = {
    "authorization": {"headers": {"authorization": "Bearer good-1"}},
    "x-api-key": {"headers": {"x-api-key": "k-1"}},  # audit.redact_headers by default
    "cookie": {"headers": {"cookie": "session=1"}},
    "body": {
        "method": "POST",
        "headers": {"content-type": "application/json"},
        "body": '{"admin": true}',
    },
    "query": {"path": "/api/items?token=t-1"},
    "plain": {},
    # Not under /api/*: Istio alone decides, whatever the Rego modules read.
    "outside": {"path": "/other", "headers": {"authorization": "Bearer good-1"}},
}
KINDS = list(SENT)


def sent(kind: str) -> external_auth_pb2.CheckRequest:
    fields = SENT[kind]
    return build_check_request(
        RequestUnderTest(
            path=fields.get("path", "/api/items"),
            method=fields.get("method", "GET"),
            principal="spiffe://example.org/ns/default/sa/frontend",
            headers=fields.get("headers", {}),
            body=fields.get("body"),
            destination=Destination(namespace="default", labels={"app": "api"}, service="api"),
        )
    )


def policy_dir(root: Path, *, istio: str = API_ISTIO, rego: str = ALLOW_ALL) -> Path:
    (root / "istio").mkdir(parents=True)
    (root / "istio" / "api.yaml").write_text(istio)
    (root / "rego" / "envoy" / "authz").mkdir(parents=True)
    (root / "rego" / "envoy" / "authz" / "policy.rego").write_text(rego)
    return root


def record(root: Path, flags: Mapping[str, Any] | None = None) -> str:
    """Every kind of request, twice, decided on the recorded set into a store; its URL."""
    recorded = policy_dir(root / "recorded")
    records = decide_into_store(
        recorded, root / "data", [sent(k) for k in KINDS for _ in range(2)], flags=flags
    )
    assert all(r.allowed for r in records), [r.reason for r in records]
    return sqlite_url(root / "data")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("recorded")
    return root, record(root)


def replay(
    store: tuple[Path, str], tmp_path: Path, *, istio: str = API_ISTIO, rego: str = ALLOW_ALL
) -> dict[str, Any]:
    root, url = store
    candidate = policy_dir(tmp_path / "candidate", istio=istio, rego=rego)
    return replay_store(url, config_for(root / "data"), candidate)


def counts(report: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "reevaluated": report["reevaluated"],
        "unchanged": report["unchanged"],
        "flips": report["flips"],
        "not_reevaluable": report["not_reevaluable"],
    }


def expected(
    *, not_reevaluable: Mapping[str, int], allow_to_deny: int, unchanged: int
) -> dict[str, Any]:
    return {
        "reevaluated": allow_to_deny + unchanged,
        "unchanged": unchanged,
        "flips": {"allow_to_deny": allow_to_deny, "deny_to_allow": 0},
        "not_reevaluable": dict(not_reevaluable),
    }


def rego_allow(condition: str) -> str:
    return f"package envoy.authz\n\ndefault allow := false\n\nallow if {{\n\t{condition}\n}}\n"


def test_the_recorded_set_replays_unchanged(store: tuple[Path, str], tmp_path: Path) -> None:
    report = replay(store, tmp_path)
    assert report["considered"] == 2 * len(KINDS)
    assert counts(report) == expected(not_reevaluable={}, allow_to_deny=0, unchanged=14)


def test_an_istio_condition_on_a_redacted_header_is_counted(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    requires_token = API_ISTIO.replace(
        '  - from: [{source: {principals: ["example.org/ns/default/sa/frontend"]}}]\n',
        '  - from: [{source: {principals: ["example.org/ns/default/sa/frontend"]}}]\n'
        '    when: [{key: "request.headers[Authorization]", values: ["Bearer good-1"]}]\n',
    )
    assert requires_token != API_ISTIO
    report = replay(store, tmp_path, istio=requires_token)
    # The requests without the header are denied now; those with it cannot be told,
    # inside /api/* or outside it (an Istio condition reads it wherever Rego is).
    assert counts(report) == expected(
        not_reevaluable={"an Istio policy reads header authorization, which is not stored": 4},
        allow_to_deny=10,
        unchanged=0,
    )


@pytest.mark.parametrize(
    ("condition", "kind", "reason"),
    [
        (
            'input.attributes.request.http.headers["x-api-key"] == "k-1"',
            "x-api-key",
            "a Rego module reads header x-api-key, which is not stored",
        ),
        (
            'input.attributes.request.http.headers.authorization == "Bearer good-1"',
            "authorization",
            "a Rego module reads header authorization, which is not stored",
        ),
        (
            "input.parsed_body.admin == true",
            "body",
            "a Rego module reads the body, which is not stored",
        ),
        (
            'input.parsed_query.token == ["t-1"]',
            "query",
            "a Rego module reads the query, whose token is not stored",
        ),
    ],
    ids=["configured-header", "authorization", "body", "query"],
)
def test_rego_reading_what_was_not_kept_is_counted(
    store: tuple[Path, str], tmp_path: Path, condition: str, kind: str, reason: str
) -> None:
    report = replay(store, tmp_path, rego=rego_allow(condition))
    # Only the two requests of `kind` carried what the candidate allows on; the other
    # /api/* requests are denied now, and Istio alone still allows /other.
    assert counts(report) == expected(not_reevaluable={reason: 2}, allow_to_deny=10, unchanged=2), (
        kind
    )


def test_rego_reading_headers_it_does_not_name_is_counted_for_every_redacted_header(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    any_bearer = rego_allow(
        'some name\n\tstartswith(input.attributes.request.http.headers[name], "Bearer good")'
    )
    report = replay(store, tmp_path, rego=any_bearer)
    assert counts(report) == expected(
        not_reevaluable={
            f"a Rego module reads headers without naming them, and {name} is not stored": 2
            for name in ("authorization", "cookie", "x-api-key")
        },
        allow_to_deny=6,  # body, query and plain carry no such header, and are denied
        unchanged=2,
    )


def test_rego_reading_the_raw_path_of_a_redacted_query_is_not_called_unchanged(
    store: tuple[Path, str], tmp_path: Path
) -> None:
    # With the token in place of its hash this denies the query requests: a replay that
    # read the stored path would call them unchanged. (It names neither the parameter
    # nor the query, which the module's text would give away.)
    no_token_in_path = rego_allow('not contains(input.attributes.request.http.path, "=t-1")')
    report = replay(store, tmp_path, rego=no_token_in_path)
    assert counts(report) == expected(
        not_reevaluable={
            "a Rego module reads the path with its query, whose token is not stored": 2
        },
        allow_to_deny=0,
        unchanged=12,
    )


def test_a_body_kept_in_full_is_re_evaluated_and_a_cut_one_is_counted(tmp_path: Path) -> None:
    reads_body = rego_allow("input.parsed_body.admin == true")
    body_bytes = len(SENT["body"]["body"])
    for max_bytes, reasons in [
        (body_bytes, {}),
        (body_bytes - 1, {"a Rego module reads the body, which is stored cut short": 2}),
    ]:
        root = tmp_path / str(max_bytes)
        url = record(root, {"audit.store_body": True, "audit.max_body_bytes": max_bytes})
        candidate = policy_dir(root / "candidate", rego=reads_body)
        report = replay_store(url, config_for(root / "data"), candidate)
        kept = not reasons
        assert counts(report) == expected(
            not_reevaluable=reasons,
            allow_to_deny=10,
            unchanged=2 + (2 if kept else 0),  # /other, and the kept admin bodies
        ), max_bytes


def test_decisions_without_a_snapshot_are_counted(tmp_path: Path) -> None:
    candidate = policy_dir(tmp_path / "candidate")
    decisions: list[dict[str, Any]] = [
        {"decision_id": f"{n:032x}", "allowed": True, "request": None, "redacted": []}
        for n in range(3)
    ]
    report = replay_decisions(config_for(tmp_path / "data"), candidate, decisions)
    assert counts(report) == expected(
        not_reevaluable={"no request snapshot was stored": 3}, allow_to_deny=0, unchanged=0
    )
