"""Table tests for decision → CheckResponse (the ext_authz output edge)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.rpc import code_pb2

from authz.check_response import (
    DECISION_ID_HEADER,
    allow_response,
    deny_response,
    dry_run_metadata,
    rego_dry_run_metadata,
)
from authz.errors import ResponseBuildError
from authz.istio_engine import IstioDecision, ShadowResult
from authz.rego_decision import RegoDecision

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _headers(options: Any) -> list[tuple[str, str, int]]:
    return [(o.header.key, o.header.value, o.append_action) for o in options]


def _metadata(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata)


def test_allow_response_fields() -> None:
    response = allow_response(decision_id="d-123", dynamic_metadata={"k": "v"})
    assert response.status.code == code_pb2.OK
    assert response.WhichOneof("http_response") == "ok_response"
    ok = response.ok_response
    assert _headers(ok.headers) == [(DECISION_ID_HEADER, "d-123", _OVERWRITE)]
    assert not ok.HasField("dynamic_metadata")  # deprecated field stays unset
    assert list(ok.response_headers_to_add) == []
    assert list(ok.headers_to_remove) == []
    assert _metadata(response) == {"k": "v"}


def test_allow_response_survives_the_wire() -> None:
    response = allow_response(decision_id="d-1", dynamic_metadata={})
    again = external_auth_pb2.CheckResponse.FromString(response.SerializeToString())
    assert again == response


def test_deny_response_fields() -> None:
    response = deny_response(decision_id="d-456", dynamic_metadata={"k": "v"})
    assert response.status.code == code_pb2.PERMISSION_DENIED
    assert response.WhichOneof("http_response") == "denied_response"
    denied = response.denied_response
    assert denied.status.code == 403
    assert denied.body == "RBAC: access denied"
    assert _headers(denied.headers) == [
        (DECISION_ID_HEADER, "d-456", _OVERWRITE),
        ("content-type", "text/plain", _OVERWRITE),
    ]
    assert _metadata(response) == {"k": "v"}


def test_deny_response_custom_body() -> None:
    body = "RBAC: access denied\npolicy: prod.deny-admin[rules[0]]"
    response = deny_response(decision_id="d-1", body=body, dynamic_metadata={})
    assert response.denied_response.body == body
    assert response.denied_response.status.code == 403


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"istio_dry_run_allow_shadow_engine_result": "denied"},
        {"s": "x", "n": 1.5, "b": True, "z": None, "l": [1.0, "a"], "o": {"p": "q"}},
    ],
    ids=["empty", "dry-run", "every-json-type"],
)
@pytest.mark.parametrize("build", ["allow", "deny"])
def test_dynamic_metadata_struct(metadata: dict[str, Any], build: str) -> None:
    if build == "allow":
        response = allow_response(decision_id="d", dynamic_metadata=metadata)
    else:
        response = deny_response(decision_id="d", dynamic_metadata=metadata)
    assert response.HasField("dynamic_metadata") is bool(metadata)
    assert _metadata(response) == metadata


@pytest.mark.parametrize(
    "decision_id",
    ["", "a\r\nx-injected: 1", "tab\there", "caf\u00e9"],
    ids=["empty", "crlf", "control", "non-ascii"],
)
def test_decision_id_must_be_a_header_value(decision_id: str) -> None:
    with pytest.raises(ResponseBuildError) as err:
        allow_response(decision_id=decision_id, dynamic_metadata={})
    assert err.value.reason == "invalid_decision_id"
    with pytest.raises(ResponseBuildError):
        deny_response(decision_id=decision_id, dynamic_metadata={})


def test_metadata_that_is_not_json_like_is_refused() -> None:
    with pytest.raises(ResponseBuildError) as err:
        allow_response(decision_id="d", dynamic_metadata={"x": object()})
    assert err.value.reason == "invalid_dynamic_metadata"


@pytest.mark.parametrize(
    ("allow_shadow", "deny_shadow", "expected"),
    [
        (None, None, {}),
        (
            ShadowResult(allowed=True, effective_policy_id="ns.p[rules[0]]"),
            None,
            {
                "istio_dry_run_allow_shadow_engine_result": "allowed",
                "istio_dry_run_allow_shadow_effective_policy_id": "ns.p[rules[0]]",
            },
        ),
        (
            ShadowResult(allowed=False, effective_policy_id=None),
            None,
            {"istio_dry_run_allow_shadow_engine_result": "denied"},
        ),
        (
            None,
            ShadowResult(allowed=False, effective_policy_id="ns.deny[rules[1]]"),
            {
                "istio_dry_run_deny_shadow_engine_result": "denied",
                "istio_dry_run_deny_shadow_effective_policy_id": "ns.deny[rules[1]]",
            },
        ),
        (
            None,
            ShadowResult(allowed=True, effective_policy_id=None),
            {"istio_dry_run_deny_shadow_engine_result": "allowed"},
        ),
        (
            ShadowResult(allowed=True, effective_policy_id="ns.a[rules[0]]"),
            ShadowResult(allowed=False, effective_policy_id="ns.d[rules[0]]"),
            {
                "istio_dry_run_allow_shadow_engine_result": "allowed",
                "istio_dry_run_allow_shadow_effective_policy_id": "ns.a[rules[0]]",
                "istio_dry_run_deny_shadow_engine_result": "denied",
                "istio_dry_run_deny_shadow_effective_policy_id": "ns.d[rules[0]]",
            },
        ),
    ],
    ids=[
        "no-dry-run",
        "allow-matched",
        "allow-nothing-matched",
        "deny-matched",
        "deny-nothing-matched",
        "both",
    ],
)
def test_dry_run_metadata(
    allow_shadow: ShadowResult | None,
    deny_shadow: ShadowResult | None,
    expected: dict[str, str],
) -> None:
    decision = IstioDecision(
        allowed=True,
        reason="allowed_by_policy",
        dry_run_allow=allow_shadow,
        dry_run_deny=deny_shadow,
    )
    metadata = dry_run_metadata(decision)
    assert metadata == expected
    # It feeds straight into a response: a dry-run deny never changes the verdict.
    response = allow_response(decision_id="d", dynamic_metadata=metadata)
    assert response.status.code == code_pb2.OK
    assert _metadata(response) == expected


# -- Rego decisions -------------------------------------------------------------------

_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def test_allow_response_carries_rego_edits_as_opa_envoy_sets_them() -> None:
    response = allow_response(
        decision_id="d-1",
        dynamic_metadata={},
        headers=[("x-user", "alice"), ("x-tag", "a"), ("x-tag", "b")],
        headers_to_remove=["authorization"],
        response_headers_to_add=[("x-policy", "rego")],
        query_parameters_to_set=[("tenant", "acme"), ("tenant", "other")],
        query_parameters_to_remove=["debug"],
    )
    ok = response.ok_response
    assert _headers(ok.headers) == [
        (DECISION_ID_HEADER, "d-1", _OVERWRITE),
        ("x-user", "alice", _APPEND),
        ("x-tag", "a", _APPEND),
        ("x-tag", "b", _APPEND),
    ]
    # Key and value only, as OPA-Envoy: the deprecated `append` is left unset.
    assert not any(o.HasField("append") for o in [*ok.headers, *ok.response_headers_to_add])
    assert list(ok.headers_to_remove) == ["authorization"]
    assert _headers(ok.response_headers_to_add) == [("x-policy", "rego", _APPEND)]
    assert [(q.key, q.value) for q in ok.query_parameters_to_set] == [
        ("tenant", "acme"),
        ("tenant", "other"),
    ]
    assert list(ok.query_parameters_to_remove) == ["debug"]


def test_deny_response_with_a_policys_status_body_and_headers() -> None:
    response = deny_response(
        decision_id="d-2",
        body="login first",
        dynamic_metadata={},
        status=401,
        headers=[("www-authenticate", "Bearer")],
        content_type=None,
    )
    denied = response.denied_response
    assert (denied.status.code, denied.body) == (401, "login first")
    assert _headers(denied.headers) == [
        (DECISION_ID_HEADER, "d-2", _OVERWRITE),
        ("www-authenticate", "Bearer", _APPEND),
    ]


@pytest.mark.parametrize("build", ["allow", "deny"])
def test_a_policy_cannot_set_the_decision_id(build: str) -> None:
    forged = [("X-Meshward-Decision-Id", "forged"), ("x-ok", "1")]
    if build == "allow":
        options = allow_response(decision_id="d", dynamic_metadata={}, headers=forged)
        found = options.ok_response.headers
    else:
        options = deny_response(decision_id="d", dynamic_metadata={}, headers=forged)
        found = options.denied_response.headers
    assert [(o.header.key, o.header.value) for o in found if o.header.key != "content-type"] == [
        (DECISION_ID_HEADER, "d"),
        ("x-ok", "1"),
    ]


@pytest.mark.parametrize(
    ("key", "value", "detail"),
    [
        ("x-a", "line\r\nx-injected: 1", "holds a NUL, CR or LF"),
        ("x-a", "nul\x00", "holds a NUL, CR or LF"),
        ("bad header", "v", "is not an HTTP token"),
        ("", "v", "is not an HTTP token"),
    ],
)
def test_headers_envoy_cannot_send_are_refused(key: str, value: str, detail: str) -> None:
    with pytest.raises(ResponseBuildError) as err:
        allow_response(decision_id="d", dynamic_metadata={}, headers=[(key, value)])
    assert err.value.reason == "bad_decision"
    assert detail in str(err.value)
    assert key != "x-a" or value not in str(err.value)  # values may carry tokens


@pytest.mark.parametrize("status", [0, 99, 600, 418])
def test_deny_status_must_be_one_envoy_knows(status: int) -> None:
    with pytest.raises(ResponseBuildError) as err:
        deny_response(decision_id="d", dynamic_metadata={}, status=status)
    assert err.value.reason == "invalid_http_status"


def _rego(allowed: bool, reason: str) -> RegoDecision:
    return RegoDecision(allowed, reason, "data.envoy.authz.allow")


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {}),
        ({"packages": ["envoy.staged"]}, {}),
        (
            {"result": _rego(False, "undefined")},
            {
                "meshward_rego_dry_run_result": "denied",
                "meshward_rego_dry_run_reason": "undefined",
            },
        ),
        (
            {"shadow": _rego(True, "allowed_by_policy"), "packages": ["a", "b"]},
            {
                "meshward_rego_dry_run_shadow_result": "allowed",
                "meshward_rego_dry_run_shadow_reason": "allowed_by_policy",
                "meshward_rego_dry_run_packages": ["a", "b"],
            },
        ),
    ],
    ids=["nothing", "packages alone", "not enforced", "shadow"],
)
def test_rego_dry_run_metadata(kwargs: dict[str, Any], expected: dict[str, Any]) -> None:
    metadata = rego_dry_run_metadata(**kwargs)
    assert metadata == expected
    response = allow_response(decision_id="d", dynamic_metadata=metadata)
    assert _metadata(response) == expected
