"""What the servicer tells the audit trail: the redacted snapshot, dry-run flips, the record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from audit.record import DecisionRecord
from audit.redaction import REDACTED_PREFIX, Redaction
from audit.sink import MemorySink
from authz.audit_record import dry_run_flips, request_snapshot, workload_name
from authz.istio_engine import IstioDecision, ShadowResult
from authz.istio_policy import Action
from authz.policy_store import PolicyStore
from authz.rego_decision import RegoDecision
from authz.rego_provider import RegoOutcome
from authz.server import AUDIT_UNAVAILABLE, AuthorizationServicer

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
REDACTION = Redaction.build(b"k" * 32, headers=["x-api-key"])


def request(
    *, path: str = "/reviews/1", body: str = "", **headers: str
) -> external_auth_pb2.CheckRequest:
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host = "GET", path, "reviews"
    http.headers.update({":path": path, ":method": "GET", **headers})
    if body:
        http.body = body
    check.attributes.context_extensions["namespace"] = "default"
    return check


def snapshot(
    check: external_auth_pb2.CheckRequest, redaction: Redaction = REDACTION
) -> tuple[external_auth_pb2.CheckRequest, tuple[str, ...]]:
    before = external_auth_pb2.CheckRequest()
    before.CopyFrom(check)
    blob, redacted = request_snapshot(check, None, redaction)
    # Compared as messages: a map's serialized order may change when entries are set.
    assert check == before, "the request must be as it was"
    return external_auth_pb2.CheckRequest.FromString(blob), redacted


def test_a_request_with_nothing_to_hide_is_kept_as_it_came() -> None:
    check = request(**{"user-agent": "curl/8.5", "traceparent": "00-1-2-01"})
    blob, redacted = request_snapshot(check, None, REDACTION)
    assert blob == check.SerializeToString()
    assert redacted == ()


def test_secrets_are_replaced_by_marks_and_bodies_left_out() -> None:
    check = request(
        path="/reviews/1?access_token=s3cret&page=2",
        body='{"password": "hunter2"}',
        authorization="Bearer abc",
        cookie="session=xyz",
        **{"x-api-key": "key1", "x-forwarded-access-token": JWT, "accept": "*/*"},
    )
    stored, redacted = snapshot(check)
    http = stored.attributes.request.http
    assert redacted == (
        "header:authorization",
        "header:cookie",
        "header:x-api-key",
        "header:x-forwarded-access-token",
        "query:access_token",
        "body",
    )
    for name in ("authorization", "cookie", "x-api-key", "x-forwarded-access-token"):
        assert http.headers[name] == REDACTION.mark(check.attributes.request.http.headers[name])
    assert http.headers["accept"] == "*/*"
    assert "s3cret" not in http.path
    assert "s3cret" not in http.headers[":path"]
    assert http.path.endswith("&page=2")
    assert http.body == ""
    raw = stored.SerializeToString()
    for secret in (b"abc", b"xyz", b"key1", JWT.encode(), b"hunter2", b"s3cret"):
        assert secret not in raw


def test_raw_header_values_are_redacted_too() -> None:
    check = request()
    check.attributes.request.http.header_map.headers.extend(
        [
            base_pb2.HeaderValue(key="Authorization", raw_value=b"Bearer raw-secret"),
            base_pb2.HeaderValue(key="x-trace", raw_value=b"t-1"),
        ]
    )
    stored, redacted = snapshot(check)
    entries = {h.key: h for h in stored.attributes.request.http.header_map.headers}
    assert "header:authorization" in redacted
    assert entries["Authorization"].raw_value.decode().startswith(REDACTED_PREFIX)
    assert entries["x-trace"].raw_value == b"t-1"
    assert b"raw-secret" not in stored.SerializeToString()


def test_a_configured_body_is_kept_cut_short() -> None:
    keep = Redaction.build(b"k" * 32, store_body=True, max_body_bytes=5)
    stored, redacted = snapshot(request(body="0123456789"), keep)
    assert stored.attributes.request.http.body == "01234"
    assert redacted == ("body:truncated",)
    whole, redacted = snapshot(request(body="0123"), keep)
    assert whole.attributes.request.http.body == "0123"
    assert redacted == ()


def view_headers(check: external_auth_pb2.CheckRequest) -> dict[str, str]:
    """The headers as the request view gives them: lowercase names, values of two
    spellings of one name joined."""
    headers: dict[str, str] = {}
    for name, value in check.attributes.request.http.headers.items():
        key = name.lower()
        headers[key] = value if key not in headers else f"{headers[key]},{value}"
    return headers


SHAPES = [
    pytest.param({}, id="nothing to hide"),
    pytest.param({"authorization": "Bearer abc"}, id="a token header"),
    pytest.param({"authorization": f"Bearer {JWT}", "cookie": "s=1"}, id="two secret names"),
    pytest.param({"x-forwarded-access-token": JWT}, id="a JWT under another name"),
    pytest.param({"authorization": "Bearer abc", "x-jwt": JWT}, id="a token and a JWT"),
    pytest.param({"x-api-key": "key1", ":path": "/eyJ-not-a-token"}, id="eyJ that is no JWT"),
    pytest.param({"x-thing": "eyJ but not a token"}, id="eyJ in a plain value"),
]


@pytest.mark.parametrize("headers", SHAPES)
def test_the_request_views_headers_give_the_same_snapshot(headers: dict[str, str]) -> None:
    # With the view's headers, a request of Envoy's usual shape (header map, query in
    # the path, no body) takes a shorter way; the stored bytes and marks are the same.
    check = request(path="/reviews/1?page=2", **headers)
    before = external_auth_pb2.CheckRequest()
    before.CopyFrom(check)
    fast, fast_redacted = request_snapshot(check, view_headers(check), REDACTION)
    assert check == before
    slow, slow_redacted = request_snapshot(check, None, REDACTION)
    stored = external_auth_pb2.CheckRequest.FromString(fast)
    assert stored == external_auth_pb2.CheckRequest.FromString(slow)
    assert fast_redacted == slow_redacted
    for name, value in headers.items():
        if f"header:{name}" in fast_redacted:
            assert value.encode() not in fast
            assert stored.attributes.request.http.headers[name] == REDACTION.mark(value)
    if not fast_redacted:
        assert fast == check.SerializeToString()


def test_a_jwt_under_any_header_name_is_found_with_the_views_headers() -> None:
    check = request(**{"authorization": "Bearer abc", "x-forwarded-access-token": JWT})
    blob, redacted = request_snapshot(check, view_headers(check), REDACTION)
    assert redacted == ("header:authorization", "header:x-forwarded-access-token")
    assert JWT.encode() not in blob
    assert b"Bearer abc" not in blob


@pytest.mark.parametrize("with_view", [True, False])
@pytest.mark.parametrize(
    ("headers", "names"),
    [
        ({"authorization": "Bearer one", "Authorization": "Bearer two"}, ["authorization"]),
        ({"Cookie": "s=two", "X-Jwt": JWT}, ["cookie", "x-jwt"]),
    ],
)
def test_every_spelling_of_a_secret_header_is_redacted(
    with_view: bool, headers: dict[str, str], names: list[str]
) -> None:
    # Not what Envoy sends (its names are lowercase, each once); a gRPC client may.
    check = request(**headers)
    blob, redacted = request_snapshot(check, view_headers(check) if with_view else None, REDACTION)
    assert redacted == tuple(f"header:{name}" for name in names)
    for value in headers.values():
        assert value.encode() not in blob


@pytest.mark.parametrize("with_view", [True, False])
def test_a_failure_midway_leaves_the_request_as_it_was(
    monkeypatch: pytest.MonkeyPatch, with_view: bool
) -> None:
    check = request(authorization="Bearer abc", cookie="c=1")
    before = external_auth_pb2.CheckRequest()
    before.CopyFrom(check)
    calls = []

    def mark(value: str) -> str:
        calls.append(value)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return "redacted:x"

    broken = Redaction.build(b"k" * 32)
    monkeypatch.setattr(Redaction, "mark", lambda self, value: mark(value))
    with pytest.raises(RuntimeError):
        request_snapshot(check, view_headers(check) if with_view else None, broken)
    assert check == before


# -- dry-run flips --------------------------------------------------------------------

DRY_DENY_HIT = ShadowResult(False, "default.staged[rules[1]]", ("default.staged",))
DRY_ALLOW_HIT = ShadowResult(True, "default.opening[rules[0]]", ("default.opening",))
DRY_ALLOW_MISS = ShadowResult(False, None, ("default.x", "default.y"))


def rego(allowed: bool, *, enforced: bool = True, shadow: bool | None = None) -> RegoOutcome:
    def decision(ok: bool) -> RegoDecision:
        return RegoDecision(ok, "allowed_by_policy" if ok else "denied_by_policy", "data.x.allow")

    return RegoOutcome(
        decision=decision(allowed),
        enforced=enforced,
        shadow=None if shadow is None else decision(shadow),
        dry_run_packages=("envoy.authz.mfa",) if shadow is not None else (),
    )


FLIPS: list[tuple[str, dict[str, Any], list[tuple[str, str, str]]]] = [
    (
        "a dry-run DENY that matched an allowed request would deny it",
        {
            "allowed": True,
            "istio": IstioDecision(True, "allowed_by_policy", dry_run_deny=DRY_DENY_HIT),
        },
        [("istio", "default.staged", "deny")],
    ),
    (
        "a dry-run DENY changes nothing for a request already denied",
        {
            "allowed": False,
            "istio": IstioDecision(False, "denied_by_policy", dry_run_deny=DRY_DENY_HIT),
        },
        [],
    ),
    (
        "a dry-run ALLOW that matched a request no ALLOW matched would allow it",
        {
            "allowed": False,
            "istio": IstioDecision(
                False, "no_allow_policy_matched", action=Action.ALLOW, dry_run_allow=DRY_ALLOW_HIT
            ),
        },
        [("istio", "default.opening", "allow")],
    ),
    (
        "a dry-run ALLOW cannot undo a DENY",
        {
            "allowed": False,
            "istio": IstioDecision(
                False, "denied_by_policy", action=Action.DENY, dry_run_allow=DRY_ALLOW_HIT
            ),
        },
        [],
    ),
    (
        "dry-run ALLOW policies that did not match, where no ALLOW applied, would deny",
        {
            "allowed": True,
            "istio": IstioDecision(True, "no_allow_policy", dry_run_allow=DRY_ALLOW_MISS),
        },
        [("istio", "default.x", "deny"), ("istio", "default.y", "deny")],
    ),
    (
        "... but not where an enforced ALLOW already allowed",
        {
            "allowed": True,
            "istio": IstioDecision(
                True,
                "allowed_by_policy",
                action=Action.ALLOW,
                policy_id="default.a[rules[0]]",
                dry_run_allow=DRY_ALLOW_MISS,
            ),
        },
        [],
    ),
    (
        "a Rego denial not enforced (dry-run) flips an allowed request",
        {
            "allowed": True,
            "rego": rego(False, enforced=False),
            "rego_decision": "data.envoy.authz.allow",
        },
        [("rego", "data.envoy.authz.allow", "deny")],
    ),
    (
        "a staged package that would deny",
        {"allowed": True, "rego": rego(True, shadow=False)},
        [("rego", "envoy.authz.mfa", "deny")],
    ),
    (
        "a staged package that would allow what Rego denied",
        {"allowed": False, "engine": "rego", "rego": rego(False, shadow=True)},
        [("rego", "envoy.authz.mfa", "allow")],
    ),
]


@pytest.mark.parametrize(("case", "given", "expected"), FLIPS, ids=[c for c, _, _ in FLIPS])
def test_dry_run_flips(
    case: str, given: dict[str, Any], expected: list[tuple[str, str, str]]
) -> None:
    arguments = {"engine": "istio", "istio": None, "rego": None, "rego_decision": None, **given}
    flips = dry_run_flips(**arguments)
    assert [(f["engine"], f["policy"], f["to"]) for f in flips] == expected


def test_workload_name_follows_istio_canonical_names() -> None:
    assert workload_name({"service.istio.io/canonical-name": "a", "app": "b"}, "c") == "a"
    assert workload_name({"app.kubernetes.io/name": "n", "app": "b"}, None) == "n"
    assert workload_name({"app": "b"}, "c") == "b"
    assert workload_name({}, "svc") == "svc"
    assert workload_name({}, None) is None


# -- through the servicer -------------------------------------------------------------

ALLOW_GET = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"""


class FullSink(MemorySink):
    """A sink with no room, as a full spool answers."""

    def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
        super().submit(record, request)
        return False


def servicer(tmp_path: Path, sink: MemorySink, *, required: bool = False) -> AuthorizationServicer:
    (tmp_path / "istio").mkdir(exist_ok=True)
    (tmp_path / "istio" / "viewer.yaml").write_text(ALLOW_GET)
    store = PolicyStore(tmp_path, trust_domain="example.org")
    assert store.reload()
    return AuthorizationServicer(
        store=store,
        sink=sink,
        registry=CollectorRegistry(),
        redaction=REDACTION,
        audit_required=required,
    )


def reviews(method: str = "GET", **headers: str) -> external_auth_pb2.CheckRequest:
    check = request(authorization="Bearer abc", **headers)
    check.attributes.request.http.method = method
    check.attributes.context_extensions["labels"] = "app=reviews,version=v1"
    check.attributes.context_extensions["service"] = "reviews"
    check.attributes.source.principal = "spiffe://example.org/ns/shop/sa/web"
    check.attributes.destination.address.socket_address.port_value = 9080
    check.attributes.tls_session.sni = "outbound_.9080_._.reviews"
    return check


def test_the_record_says_who_what_where_and_how_it_ended(tmp_path: Path) -> None:
    sink = MemorySink()
    serve = servicer(tmp_path, sink)
    serve.decide(reviews())
    serve.decide(reviews("POST"))
    allowed, denied = sink.records
    assert (allowed.status, denied.status) == (None, 403)
    assert (allowed.policy, allowed.rule) == ("default.viewer", 0)
    assert (denied.policy, denied.rule, denied.reason) == (None, None, "no_allow_policy_matched")
    assert allowed.source_principal == "example.org/ns/shop/sa/web"
    assert allowed.source_namespace == "shop"
    assert allowed.destination_workload == "reviews"
    assert allowed.destination_labels == {"app": "reviews", "version": "v1"}
    assert (allowed.destination_port, allowed.sni) == (9080, "outbound_.9080_._.reviews")
    assert allowed.latency_us is not None
    assert allowed.latency_us > 0
    assert allowed.redacted == ("header:authorization",)
    snapshot = external_auth_pb2.CheckRequest.FromString(sink.requests[0] or b"")
    assert snapshot.attributes.request.http.headers["authorization"].startswith(REDACTED_PREFIX)


def test_with_audit_required_a_record_that_cannot_be_kept_denies(tmp_path: Path) -> None:
    sink = FullSink()
    serve = servicer(tmp_path, sink, required=True)
    response = serve.decide(reviews())
    assert response.HasField("denied_response")
    assert response.denied_response.status.code == 403
    assert serve.decisions.labels("deny", AUDIT_UNAVAILABLE)._value.get() == 1
    # A denial stays a denial; nothing is counted as allowed.
    serve.decide(reviews("POST"))
    assert serve.decisions.labels("allow", "allowed_by_policy")._value.get() == 0


def test_without_audit_required_the_request_is_served(tmp_path: Path) -> None:
    serve = servicer(tmp_path, FullSink(), required=False)
    assert serve.decide(reviews()).HasField("ok_response")
