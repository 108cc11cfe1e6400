"""CheckRequests from a hostile or broken sidecar, decided with the sample policy set.

The servicer catches every exception (it answers ``internal_error``, denied), so the
target asserts more than "nothing escapes": no decision is an ``internal_error`` (an
exception nobody expected), and every allow comes from a policy, never from an error.
"""

from __future__ import annotations

from pathlib import Path

from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import example, given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from audit.sink import MemorySink
from meshward.authz_runtime import build_authz
from meshward.config import Config

POLICIES = Path(__file__).parents[2] / "policies"
CONFIG = Config.model_validate(
    {"trust_domain": "example.org", "authz": {"rego": {"mode": "always"}}}
)
SINK = MemorySink()
STORE, SERVICER = build_authz(CONFIG, policies=POLICIES, sink=SINK, registry=CollectorRegistry())
assert STORE.reload(), STORE.issues

TEXT = st.text(max_size=40)
PRINCIPALS = st.one_of(
    TEXT,
    st.sampled_from(
        [
            "spiffe://example.org/ns/default/sa/frontend",
            "spiffe://example.org/ns/default/sa/reviews",
            "spiffe://example.org/ns/tenant/sa/partner",
            "spiffe://example.org/ns/default/sa/admin",
            "",
        ]
    ),
)
PATHS = st.one_of(
    TEXT,
    st.sampled_from(
        ["/admin/users/7", "/reviews/1?x=%zz", "/ratings/1", "/%2e%2e/admin", "//a//b"]
    ),
)
HEADERS = st.dictionaries(
    st.one_of(
        st.sampled_from(["authorization", "traceparent", "x-request-id", ":path", "cookie"]), TEXT
    ),
    st.one_of(TEXT, st.sampled_from(["Bearer a.b.c", "Bearer ", "Bearer e30.e30.e30"])),
    max_size=6,
)


@st.composite
def check_requests(draw: st.DrawFn) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.principal = draw(PRINCIPALS)
    attributes.source.address.socket_address.address = draw(
        st.one_of(st.ip_addresses().map(str), TEXT)
    )
    attributes.destination.principal = "spiffe://example.org/ns/default/sa/admin"
    attributes.destination.address.socket_address.address = "10.0.0.9"
    attributes.destination.address.socket_address.port_value = draw(
        st.integers(min_value=0, max_value=65535)
    )
    http = attributes.request.http
    http.method = draw(st.one_of(st.sampled_from(["GET", "DELETE", "POST", ""]), TEXT))
    http.path = draw(PATHS)
    http.host = draw(st.one_of(st.just("admin"), TEXT))
    for key, value in draw(HEADERS).items():
        http.headers[key] = value
    http.body = draw(st.one_of(st.just(""), TEXT, st.just('{"a": [1, {"b": null}]}')))
    namespace = draw(st.one_of(st.just("default"), TEXT))
    attributes.context_extensions["namespace"] = namespace
    attributes.context_extensions["labels"] = draw(st.one_of(st.just("app=admin"), TEXT))
    return request


@given(check_requests())
@example(external_auth_pb2.CheckRequest())
def test_check_requests(request: external_auth_pb2.CheckRequest) -> None:
    response = SERVICER.decide(request)
    [record] = SINK.records
    SINK.records.clear()
    assert record.reason != "internal_error", record
    if response.status.code == 0:
        assert record.allowed, record
        assert record.reason == "allowed_by_policy", record
    else:
        assert not record.allowed
