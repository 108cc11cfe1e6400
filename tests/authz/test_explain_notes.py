"""What ``explain`` says when it cannot show everything, for decisions Envoy made."""

from __future__ import annotations

from typing import Any

from authz.explain import explain
from authz.rego_provider import RegoSettings
from authz.replay import logged_headers_marker


def notes(**record: Any) -> list[str]:
    out = explain(
        {"decision_id": "d1", "request": None, **record},
        None,
        servicer=None,
        sink=None,
        rego=RegoSettings(),
    )
    return list(out["notes"])


def test_envoy_decisions_without_a_policy_set_say_why() -> None:
    (note,) = notes(engine="envoy-rbac", policy_set_version=None)
    assert note.startswith("this decision names no policy set: Envoy's RBAC filters decided")
    assert note.endswith("only the record is shown")
    (note,) = notes(engine="istio", policy_set_version="abc")
    assert note.startswith("the policy set that made this decision is not in the audit trail")


def test_the_headers_envoy_logged_are_named_as_such_and_secrets_as_redacted() -> None:
    marker = logged_headers_marker([":path", "x-tenant"])
    redacted, logged, _ = notes(
        engine="envoy-rbac", policy_set_version="abc", redacted=["header:authorization", marker]
    )
    assert redacted == "not kept in the trail, and so evaluated as their redacted hash: " + (
        "header:authorization"
    )
    assert logged == (
        "Envoy decided this request and its access log carried only these headers: "
        ":path, x-tenant; a policy reading another header cannot be evaluated again"
    )
