"""Request-level policy tests: build the CheckRequest, decide it, compare the decision.

The test file format is in ``authz.request_test_file``. The CheckRequest is what
Envoy's ext_authz filter sends for the request with meshward's sidecar bootstrap: peer
and local addresses, ``source.principal`` from the client certificate,
method/path/host, headers with the pseudo-headers and the ``x-request-id`` /
``x-forwarded-proto`` Envoy adds, a ``content-length`` for a body, the body cut at
``max_request_bytes`` with ``x-envoy-auth-partial-body: true``, and
``context_extensions`` ``namespace``, ``labels`` (``k=v,k2=v2``) and ``service``.

The decision is read as Envoy and the audit trail see it: the CheckResponse (status,
body, headers) and the decision record the servicer hands its sink (reason, engine,
deciding policy, dry-run results).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.rpc import code_pb2

from audit.record import DecisionRecord
from audit.sink import MemorySink
from authz.check_response import DECISION_ID_HEADER
from authz.rego_input import PARTIAL_BODY_HEADER
from authz.request_test_file import DRY_RUN_KEYS, Expectation, RequestTest, RequestUnderTest

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "Decider",
    "Mismatch",
    "Observed",
    "RequestTestOutcome",
    "RequestTestResult",
    "build_check_request",
    "compare",
    "decide",
    "observe",
    "run_request_test",
    "unsigned_jwt",
]

# meshward's sidecar bootstrap: with_request_body {max_request_bytes: 8192, allow_partial_message}.
DEFAULT_MAX_REQUEST_BYTES = 8192


# -- the CheckRequest --------------------------------------------------------------------


def build_check_request(
    request: RequestUnderTest,
    *,
    request_id: str = "meshward-policy-test",
    now: datetime | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy's ext_authz filter sends for ``request`` (see the module doc)."""
    check = external_auth_pb2.CheckRequest()
    attrs = check.attributes
    source = attrs.source
    source.address.socket_address.address = request.source_ip
    source.address.socket_address.port_value = request.source_port
    if request.principal is not None:
        source.principal = request.principal
    destination = request.destination
    attrs.destination.address.socket_address.address = destination.ip
    attrs.destination.address.socket_address.port_value = destination.port
    if destination.principal is not None:
        attrs.destination.principal = destination.principal

    http = attrs.request.http
    http.id = request_id
    http.method = request.method
    http.path = request.path
    http.host = request.authority
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    headers = {
        ":authority": request.authority,
        ":method": request.method,
        ":path": request.path,
        ":scheme": "http",
        "x-forwarded-proto": "http",
        "x-request-id": request_id,
    }
    headers.update(request.headers)
    if request.bearer is not None:
        headers["authorization"] = f"Bearer {unsigned_jwt(request.bearer)}"
    if request.body is not None:
        body = request.body.encode()
        headers.setdefault("content-length", str(len(body)))
        http.size = len(body)
        if len(body) > max_request_bytes:
            headers[PARTIAL_BODY_HEADER] = "true"
            body = body[:max_request_bytes]
        http.body = body.decode("utf-8", "ignore")  # a cut may split a character
    for name, value in headers.items():
        http.headers[name] = value
    attrs.request.time.FromDatetime(now or datetime.now(UTC))

    extensions = attrs.context_extensions
    if destination.namespace is not None:
        extensions["namespace"] = destination.namespace
    if destination.labels:
        extensions["labels"] = ",".join(f"{k}={v}" for k, v in destination.labels.items())
    if destination.service is not None:
        extensions["service"] = destination.service
    return check


def unsigned_jwt(claims: Mapping[str, Any]) -> str:
    """A JWT of ``claims`` with ``alg: none``: what a policy that only decodes tokens reads."""

    def part(value: Any) -> str:
        raw = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(dict(claims))}."


# -- running and comparing ---------------------------------------------------------------


class Decider(Protocol):
    """What the runner needs of the ext_authz servicer: one synchronous decision."""

    def decide(self, request: external_auth_pb2.CheckRequest) -> Any: ...


@dataclass(slots=True, frozen=True)
class Observed:
    """The decision as Envoy and the audit trail see it."""

    allowed: bool
    reason: str
    policy: str | None
    engine: str
    status: int | None  # HTTP status of a denial
    body: str | None  # body of a denial
    upstream_headers: Mapping[str, str]
    removed_headers: tuple[str, ...]
    response_headers: Mapping[str, str]
    dry_run: Mapping[str, Any]
    error: str | None = None
    record: DecisionRecord | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "allowed": self.allowed,
            "reason": self.reason,
            "policy": self.policy,
            "engine": self.engine,
        }
        if not self.allowed:
            out["status"] = self.status
            out["body"] = self.body
        out["upstream_headers"] = dict(self.upstream_headers)
        out["removed_headers"] = list(self.removed_headers)
        out["response_headers"] = dict(self.response_headers)
        out["dry_run"] = dict(self.dry_run)
        if self.error:
            out["error"] = self.error
        return out


def observe(response: external_auth_pb2.CheckResponse, record: DecisionRecord | None) -> Observed:
    allowed = response.status.code == code_pb2.OK
    kind = response.WhichOneof("http_response")
    status = body = None
    upstream: dict[str, str] = {}
    removed: tuple[str, ...] = ()
    to_client: dict[str, str] = {}
    if kind == "denied_response":
        denied = response.denied_response
        status = int(denied.status.code)
        body = denied.body
        to_client = _header_map(denied.headers)
    elif kind == "ok_response":
        upstream = _header_map(response.ok_response.headers)
        removed = tuple(sorted(n.lower() for n in response.ok_response.headers_to_remove))
        to_client = _header_map(response.ok_response.response_headers_to_add)
    metadata = json_format.MessageToDict(response.dynamic_metadata)
    return Observed(
        allowed=allowed,
        reason=record.reason if record else "no_decision_record",
        policy=record.policy_id if record else None,
        engine=record.engine if record else "",
        status=status,
        body=body,
        upstream_headers=upstream,
        removed_headers=removed,
        response_headers=to_client,
        dry_run=(record.dry_run or {}) if record else metadata,
        error=record.error if record else None,
        record=record,
    )


def _header_map(options: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for option in options:
        name = option.header.key.lower()
        value = option.header.value or option.header.raw_value.decode("utf-8", "replace")
        out[name] = value if name not in out else f"{out[name]},{value}"
    out.pop(DECISION_ID_HEADER, None)  # random per decision: nothing a test could expect
    return out


@dataclass(slots=True, frozen=True)
class Mismatch:
    field: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        return f"{self.field}: expected {_show(self.expected)}, got {_show(self.got)}"

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.field, "expected": self.expected, "got": self.got}


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and value.strip() == value else json.dumps(value)
    return json.dumps(value, sort_keys=True)


def compare(expect: Expectation, got: Observed) -> list[Mismatch]:
    """Every expectation the decision does not meet, in the order of the format."""
    out: list[Mismatch] = []
    if expect.allowed != got.allowed:
        out.append(Mismatch("allowed", expect.allowed, got.allowed))
    if expect.status is not None and expect.status != got.status:
        out.append(Mismatch("status", expect.status, got.status))
    if expect.reason is not None and expect.reason != got.reason:
        out.append(Mismatch("reason", expect.reason, got.reason))
    if expect.engine is not None and expect.engine != got.engine:
        out.append(Mismatch("engine", expect.engine, got.engine))
    if expect.expects_policy and expect.policy != got.policy:
        out.append(Mismatch("policy", expect.policy, got.policy))
    if expect.body is not None and expect.body != got.body:
        out.append(Mismatch("body", expect.body, got.body))
    out.extend(_headers_mismatch("upstream_headers", expect.upstream_headers, got.upstream_headers))
    if expect.removed_headers is not None and expect.removed_headers != got.removed_headers:
        out.append(
            Mismatch("removed_headers", list(expect.removed_headers), list(got.removed_headers))
        )
    out.extend(_headers_mismatch("response_headers", expect.response_headers, got.response_headers))
    if expect.expects_dry_run:
        if expect.dry_run is None:
            if got.dry_run:
                out.append(Mismatch("dry_run", None, dict(got.dry_run)))
        else:
            for key, value in expect.dry_run.items():
                if got.dry_run.get(key) != value:
                    name = next((k for k, v in DRY_RUN_KEYS.items() if v == key), key)
                    out.append(Mismatch(f"dry_run.{name}", value, got.dry_run.get(key)))
    return out


def _headers_mismatch(
    where: str, expected: Mapping[str, str | None], got: Mapping[str, str]
) -> Iterator[Mismatch]:
    for name, value in expected.items():
        if got.get(name) != value:
            yield Mismatch(f"{where}.{name}", value, got.get(name))


class RequestTestOutcome(StrEnum):
    PASSED = "pass"
    FAILED = "fail"
    ERRORED = "error"


@dataclass(slots=True, frozen=True)
class RequestTestResult:
    test: RequestTest
    outcome: RequestTestOutcome
    observed: Observed | None = None
    mismatches: tuple[Mismatch, ...] = ()
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "request",
            "name": self.test.name,
            "file": self.test.file,
            "line": self.test.line,
            "result": str(self.outcome),
            "detail": self.detail,
        }
        if self.mismatches:
            out["mismatches"] = [m.as_dict() for m in self.mismatches]
        if self.observed is not None and self.outcome is not RequestTestOutcome.PASSED:
            out["got"] = self.observed.as_dict()
        return out


def decide(check: external_auth_pb2.CheckRequest, servicer: Decider, sink: MemorySink) -> Observed:
    """Send ``check`` through ``servicer`` and read back what it decided."""
    before = len(sink.records)
    response = servicer.decide(check)
    record = sink.records[-1] if len(sink.records) > before else None
    return observe(response, record)


def run_request_test(test: RequestTest, servicer: Decider, sink: MemorySink) -> RequestTestResult:
    if test.expect is None:
        return RequestTestResult(
            test, RequestTestOutcome.ERRORED, detail="no expect: nothing to test"
        )
    observed = decide(build_check_request(test.request), servicer, sink)
    if observed.record is None:
        return RequestTestResult(
            test, RequestTestOutcome.ERRORED, observed, detail="the decision wrote no audit record"
        )
    mismatches = tuple(compare(test.expect, observed))
    outcome = RequestTestOutcome.FAILED if mismatches else RequestTestOutcome.PASSED
    detail = "; ".join(str(m) for m in mismatches)
    return RequestTestResult(test, outcome, observed, mismatches, detail)
