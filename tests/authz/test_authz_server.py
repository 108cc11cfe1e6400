"""AuthorizationServicer.decide with real Istio and Rego policies loaded from a directory.

Every case writes a policy directory (istio/ and rego/), loads it with the server's
own PolicyStore and asks the servicer, as Envoy would: the CheckResponse, the
decision record and the metrics are all checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import json_format
from google.rpc import code_pb2
from prometheus_client import CollectorRegistry

from audit.record import DecisionRecord
from audit.sink import MemorySink
from authz.check_response import DECISION_ID_HEADER
from authz.policy_store import PolicyStore, ServedPolicies
from authz.rego_engine import RegoModule, compile_rego
from authz.rego_provider import RegoSettings
from authz.server import AuthorizationServicer

OK = code_pb2.OK
DENIED = code_pb2.PERMISSION_DENIED
CLIENT = "spiffe://example.org/ns/default/sa/client"
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
DECISION = "data.envoy.authz.allow"

# -- Istio policies -------------------------------------------------------------------

CUSTOM_API = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: CUSTOM
  provider: {name: rego}
  rules: [{to: [{operation: {paths: ["/api/*"]}}]}]
"""
CUSTOM_ID = "default.ext[rules[0]]"
DENY_ADMIN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/api/admin*"]}}]}]
"""
DENY_ADMIN_ID = "default.no-admin[rules[0]]"
ALLOW_CLIENT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: client-only, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules: [{from: [{source: {principals: ["example.org/ns/default/sa/client"]}}]}]
"""
ALLOW_CLIENT_ID = "default.client-only[rules[0]]"

# -- Rego policies --------------------------------------------------------------------

ALLOW_GETS = """\
package envoy.authz

default allow := false

allow if input.attributes.request.http.method == "GET"
"""
EDITS = """\
package envoy.authz

allow := {
\t"allowed": true,
\t"headers": {"x-user": "alice", "x-tags": ["a", "b"]},
\t"request_headers_to_remove": ["authorization"],
\t"response_headers_to_add": {"x-policy": "rego"},
\t"query_parameters_to_set": {"tenant": "acme"},
\t"query_parameters_to_remove": ["debug"],
\t"dynamic_metadata": {"subject": "alice"},
}
"""
CUSTOM_DENY = """\
package envoy.authz

allow := {
\t"allowed": false,
\t"http_status": 401,
\t"body": "a token from issuer.example.org is required",
\t"headers": {"www-authenticate": "Bearer realm=\\"mesh\\""},
\t"dynamic_metadata": {"why": "no token"},
}
"""
# The decision reads a staged package; without it (the enforced set) DELETE is allowed.
READS_STAGED = """\
package envoy.authz

import data.envoy.staged

default allow := true

allow := false if staged.deny
"""
STAGED = """\
package envoy.staged

deny if input.attributes.request.http.method == "DELETE"
"""
STAGED_ANNOTATED = "# METADATA\n# custom:\n#   dry_run: true\n" + STAGED


def rego(source: str) -> dict[str, str]:
    return {"rego/envoy/authz/policy.rego": source}


def check(
    method: str = "GET",
    path: str = "/api/items",
    *,
    principal: str = CLIENT,
    headers: dict[str, str] | None = None,
    body: str = "",
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.principal = principal
    attributes.source.address.socket_address.address = "10.0.0.7"
    attributes.destination.principal = "spiffe://example.org/ns/default/sa/reviews"
    http = attributes.request.http
    http.method = method
    http.path = path
    http.host = "reviews.default.svc"
    for name, value in (headers or {}).items():
        http.headers[name] = value
    http.body = body
    attributes.context_extensions["namespace"] = "default"
    attributes.context_extensions["labels"] = "app=reviews"
    return request


@dataclass
class Authz:
    servicer: AuthorizationServicer
    store: PolicyStore
    sink: MemorySink
    registry: CollectorRegistry

    def decide(self, request: external_auth_pb2.CheckRequest) -> external_auth_pb2.CheckResponse:
        response: external_auth_pb2.CheckResponse = self.servicer.decide(request)
        # Everything a decision produces must survive the wire and the JSON audit sink.
        assert external_auth_pb2.CheckResponse.FromString(response.SerializeToString()) == response
        json.dumps(asdict(self.sink.records[-1]))
        return response

    @property
    def record(self) -> DecisionRecord:
        return self.sink.records[-1]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


Make = Callable[..., Authz]


@pytest.fixture
def make(tmp_path: Path) -> Make:
    def build(
        files: dict[str, str],
        *,
        dry_run_packages: tuple[str, ...] = (),
        explain: bool = False,
        **settings: Any,
    ) -> Authz:
        write(tmp_path, files)
        store = PolicyStore(
            tmp_path,
            trust_domain="example.org",
            rego_dry_run_packages=dry_run_packages,
        )
        assert store.reload(), store.issues
        sink, registry = MemorySink(), CollectorRegistry()
        servicer = AuthorizationServicer(
            store=store,
            sink=sink,
            registry=registry,
            explain_denials=explain,
            rego=RegoSettings(**settings),
        )
        return Authz(servicer, store, sink, registry)

    return build


def write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def headers(options: Any) -> list[tuple[str, str, int, bool]]:
    return [(o.header.key, o.header.value, o.append_action, o.HasField("append")) for o in options]


def metadata(response: external_auth_pb2.CheckResponse) -> dict[str, Any]:
    return json_format.MessageToDict(response.dynamic_metadata)


def decision_id(response: external_auth_pb2.CheckResponse) -> str:
    options = (
        response.ok_response.headers
        if response.status.code == OK
        else response.denied_response.headers
    )
    [value] = [o.header.value for o in options if o.header.key == DECISION_ID_HEADER]
    return value


# -- Rego as Istio's CUSTOM provider --------------------------------------------------

COMBINED = [
    pytest.param(
        {"istio/p.yaml": CUSTOM_API, **rego(ALLOW_GETS)},
        check("GET", "/api/items"),
        (True, "allowed_by_policy", "rego", CUSTOM_ID),
        {"allowed": True, "reason": "allowed_by_policy"},
        id="custom: rego allows, no Istio ALLOW applies",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API, **rego(ALLOW_GETS)},
        check("POST", "/api/items"),
        (False, "denied_by_policy", "rego", CUSTOM_ID),
        {"allowed": False, "reason": "denied_by_policy", "http_status": 403},
        id="custom: rego denies",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API + "---\n" + DENY_ADMIN, **rego(ALLOW_GETS)},
        check("GET", "/api/admin/users"),
        (False, "denied_by_policy", "istio", DENY_ADMIN_ID),
        {"allowed": True, "reason": "allowed_by_policy"},
        id="custom: rego allows, Istio DENY still denies",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API + "---\n" + ALLOW_CLIENT, **rego(ALLOW_GETS)},
        check("GET", "/api/items"),
        (True, "allowed_by_policy", "istio", ALLOW_CLIENT_ID),
        {"allowed": True, "reason": "allowed_by_policy"},
        id="custom: rego allows, an Istio ALLOW decides",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API + "---\n" + ALLOW_CLIENT, **rego(ALLOW_GETS)},
        check("GET", "/api/items", principal="spiffe://example.org/ns/default/sa/other"),
        (False, "no_allow_policy_matched", "istio", None),
        {"allowed": True, "reason": "allowed_by_policy"},
        id="custom: rego allows, no Istio ALLOW matches",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API, **rego(ALLOW_GETS)},
        check("POST", "/other"),
        (True, "no_allow_policy", "istio", None),
        None,
        id="custom: no CUSTOM match, rego not asked",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API},
        check("GET", "/api/items"),
        (False, "custom_provider_unavailable", "error", CUSTOM_ID),
        None,
        id="custom: no rego modules",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API, "rego/envoy/authz/policy_test.rego": "package x\n"},
        check("GET", "/api/items"),
        (False, "custom_provider_unavailable", "error", CUSTOM_ID),
        None,
        id="custom: only rego tests",
    ),
]


@pytest.mark.parametrize(("files", "request_", "expected", "rego_result"), COMBINED)
def test_istio_and_rego_combined(
    make: Make,
    files: dict[str, str],
    request_: external_auth_pb2.CheckRequest,
    expected: tuple[bool, str, str, str | None],
    rego_result: dict[str, Any] | None,
) -> None:
    authz = make(files)
    response = authz.decide(request_)
    record = authz.record
    assert (record.allowed, record.reason, record.engine, record.policy_id) == expected
    assert response.status.code == (OK if expected[0] else DENIED)
    assert record.rego_result == rego_result
    assert record.rego_decision == (DECISION if rego_result else None)
    assert record.rego_enforced == (True if rego_result else None)
    assert record.policy_set_version == authz.store.current.version  # type: ignore[union-attr]
    assert decision_id(response) == record.decision_id
    result = "allow" if expected[0] else "deny"
    assert authz.metric("meshward_authz_decisions_total", result=result, reason=expected[1]) == 1
    assert authz.metric("meshward_authz_decision_seconds_count", engine=expected[2]) == 1
    evaluated = 0 if rego_result is None else 1
    outcomes = sum(
        authz.metric("meshward_rego_evaluations_total", outcome=o) for o in ("allowed", "denied")
    )
    assert outcomes == evaluated


def test_rego_denial_is_answered_with_the_policys_response(make: Make) -> None:
    authz = make({"istio/p.yaml": CUSTOM_API, **rego(CUSTOM_DENY)})
    response = authz.decide(check())
    denied = response.denied_response
    assert denied.status.code == 401
    assert denied.body == "a token from issuer.example.org is required"
    assert headers(denied.headers) == [
        (DECISION_ID_HEADER, authz.record.decision_id, OVERWRITE, False),
        ("www-authenticate", 'Bearer realm="mesh"', APPEND, False),
    ]
    assert metadata(response) == {"why": "no token"}
    assert authz.record.rego_result == {
        "allowed": False,
        "reason": "denied_by_policy",
        "http_status": 401,
    }
    assert authz.metric("meshward_rego_evaluations_total", outcome="denied") == 1


def test_allow_edits_wait_for_istio_and_are_set_as_opa_envoy_sets_them(make: Make) -> None:
    authz = make({"istio/p.yaml": CUSTOM_API + "---\n" + DENY_ADMIN, **rego(EDITS)})
    response = authz.decide(check("GET", "/api/items?debug=1"))
    assert response.status.code == OK
    ok = response.ok_response
    assert headers(ok.headers) == [
        (DECISION_ID_HEADER, authz.record.decision_id, OVERWRITE, False),
        ("x-tags", "a", APPEND, False),
        ("x-tags", "b", APPEND, False),
        ("x-user", "alice", APPEND, False),
    ]
    assert list(ok.headers_to_remove) == ["authorization"]
    assert headers(ok.response_headers_to_add) == [("x-policy", "rego", APPEND, False)]
    assert [(q.key, q.value) for q in ok.query_parameters_to_set] == [("tenant", "acme")]
    assert list(ok.query_parameters_to_remove) == ["debug"]
    assert not ok.HasField("dynamic_metadata")  # the deprecated field stays unset
    assert metadata(response) == {"subject": "alice"}
    # The same Rego allow, then an Istio DENY: none of the provider's edits reach Envoy.
    denied = authz.decide(check("GET", "/api/admin"))
    assert denied.status.code == DENIED
    assert denied.denied_response.body == "RBAC: access denied"
    assert [h[0] for h in headers(denied.denied_response.headers)] == [
        DECISION_ID_HEADER,
        "content-type",
    ]
    # Header values and bodies never reach the record.
    assert "alice" not in json.dumps(asdict(authz.record))


# -- mode: always ---------------------------------------------------------------------

ALWAYS = [
    pytest.param(
        {"istio/p.yaml": ALLOW_CLIENT, **rego(ALLOW_GETS)},
        check("POST"),
        (False, "denied_by_policy", "rego", DECISION),
        1,
        id="Istio allows, rego denies",
    ),
    pytest.param(
        {"istio/p.yaml": ALLOW_CLIENT, **rego(ALLOW_GETS)},
        check("GET"),
        (True, "allowed_by_policy", "rego", DECISION),
        1,
        id="Istio allows, rego allows",
    ),
    pytest.param(
        {"istio/p.yaml": ALLOW_CLIENT, **rego(ALLOW_GETS)},
        check("GET", principal="spiffe://example.org/ns/default/sa/other"),
        (False, "no_allow_policy_matched", "istio", None),
        0,
        id="Istio denies, rego not asked",
    ),
    pytest.param(
        rego(ALLOW_GETS),
        check("GET"),
        (True, "allowed_by_policy", "rego", DECISION),
        1,
        id="no Istio policy, rego allows",
    ),
    pytest.param(
        {"istio/p.yaml": CUSTOM_API, **rego(ALLOW_GETS)},
        check("GET"),
        (True, "allowed_by_policy", "rego", CUSTOM_ID),
        1,
        id="CUSTOM match: one evaluation serves both",
    ),
    pytest.param(
        {"istio/p.yaml": ALLOW_CLIENT},
        check("GET"),
        (False, "rego_not_loaded", "error", None),
        0,
        id="no rego modules",
    ),
    pytest.param(
        {"istio/p.yaml": ALLOW_CLIENT},
        check("GET", principal="spiffe://example.org/ns/default/sa/other"),
        (False, "rego_not_loaded", "error", None),
        0,
        id="no rego modules, whatever Istio says",
    ),
]


@pytest.mark.parametrize(("files", "request_", "expected", "evaluations"), ALWAYS)
def test_mode_always(
    make: Make,
    files: dict[str, str],
    request_: external_auth_pb2.CheckRequest,
    expected: tuple[bool, str, str, str | None],
    evaluations: int,
) -> None:
    authz = make(files, mode="always")
    response = authz.decide(request_)
    record = authz.record
    assert (record.allowed, record.reason, record.engine, record.policy_id) == expected
    assert response.status.code == (OK if expected[0] else DENIED)
    total = sum(
        authz.metric("meshward_rego_evaluations_total", outcome=o) for o in ("allowed", "denied")
    )
    assert total == evaluations


# -- every decision form --------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    source: str
    allowed: bool
    reason: str
    status: int | None = None  # the denied response's HTTP status
    body: str = "RBAC: access denied"
    header_names: tuple[str, ...] = ()  # after the decision id
    metadata: dict[str, Any] | None = None
    outcome: str | None = None  # meshward_rego_evaluations_total, when not the reason
    error: str | None = None  # start of the record's rego_error


FORMS = [
    Form("allow := true", True, "allowed_by_policy", outcome="allowed"),
    Form("allow := false", False, "denied_by_policy", 403, header_names=("content-type",)),
    Form('allow := {"allowed": true}', True, "allowed_by_policy", outcome="allowed"),
    Form(
        'allow := {"allowed": false, "http_status": 429, "headers": {"retry-after": "3"}}',
        False,
        "denied_by_policy",
        429,
        header_names=("content-type", "retry-after"),
    ),
    Form(
        'allow := {"allowed": false, "http_status": 302, "body": "moved",'
        ' "headers": [{"location": "/login"}, {"x-why": "login"}]}',
        False,
        "denied_by_policy",
        302,
        body="moved",
        header_names=("location", "x-why"),
    ),
    Form(
        'allow := {"allowed": false, "dynamic_metadata": {"rule": "r1", "n": 2}}',
        False,
        "denied_by_policy",
        403,
        header_names=("content-type",),
        metadata={"rule": "r1", "n": 2.0},
    ),
    Form(
        'allow := {"allowed": true, "headers": {"x-meshward-decision-id": "forged"}}',
        True,
        "allowed_by_policy",
        outcome="allowed",
    ),
    Form(
        "allow if input.missing",
        False,
        "undefined",
        403,
        header_names=("content-type",),
        error="undefined:",
    ),
    Form(
        "allow := true\nallow := false",
        False,
        "eval_error",
        403,
        header_names=("content-type",),
        error="eval_error: ",
    ),
    Form(
        'allow := "yes"',
        False,
        "bad_decision",
        403,
        header_names=("content-type",),
        error="bad_decision:",
    ),
    Form(
        'allow := {"allowed": false, "http_status": 600}',
        False,
        "bad_decision",
        403,
        header_names=("content-type",),
        error="bad_decision: `http_status` 600 is not an HTTP status",
    ),
    Form(
        'allow := {"allowed": false, "http_status": 99}',
        False,
        "bad_decision",
        403,
        header_names=("content-type",),
        error="bad_decision:",
    ),
    Form(
        'allow := {"allowed": true, "headers": {"x": 1}}',
        False,
        "bad_decision",
        403,
        header_names=("content-type",),
        error="bad_decision: `headers.x` must be",
    ),
]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.source.replace("\n", "; "))
def test_decision_forms(make: Make, form: Form) -> None:
    authz = make(rego("package envoy.authz\n\n" + form.source + "\n"), mode="always")
    response = authz.decide(check())
    record = authz.record
    assert (record.allowed, record.reason) == (form.allowed, form.reason)
    assert record.engine == "rego"
    if form.allowed:
        assert response.status.code == OK
        assert headers(response.ok_response.headers)[0][:2] == (
            DECISION_ID_HEADER,
            record.decision_id,
        )
        assert len(response.ok_response.headers) == 1
    else:
        denied = response.denied_response
        assert response.status.code == DENIED
        assert (denied.status.code, denied.body) == (form.status, form.body)
        assert [h[0] for h in headers(denied.headers)] == [DECISION_ID_HEADER, *form.header_names]
    assert metadata(response) == (form.metadata or {})
    outcome = form.outcome or ("denied" if form.reason == "denied_by_policy" else form.reason)
    assert authz.metric("meshward_rego_evaluations_total", outcome=outcome) == 1
    result = "allow" if form.allowed else "deny"
    assert authz.metric("meshward_authz_decisions_total", result=result, reason=form.reason) == 1
    if form.error is None:
        assert record.rego_error is None
    else:
        assert record.rego_error is not None
        assert record.rego_error.startswith(form.error)


def test_a_header_envoy_cannot_send_fails_closed(make: Make) -> None:
    source = 'allow := {"allowed": true, "headers": {"x-echo": input.attributes.request.http.headers["x-in"]}}'
    authz = make(rego("package envoy.authz\n\n" + source + "\n"), mode="always")
    response = authz.decide(check(headers={"x-in": "fine"}))
    assert response.status.code == OK
    response = authz.decide(check(headers={"x-in": "a\nb"}))
    assert response.status.code == DENIED
    record = authz.record
    assert (record.reason, record.engine) == ("bad_decision", "error")
    assert record.error is not None
    assert "x-echo" in record.error
    assert "a\nb" not in record.error
    assert record.rego_result == {"allowed": True, "reason": "allowed_by_policy"}


def test_timeout_denies(make: Make) -> None:
    authz = make(rego(ALLOW_GETS), mode="always")
    ticks = iter([0.0, 5.0])
    engine = compile_rego([RegoModule("p.rego", ALLOW_GETS)], clock=lambda: next(ticks, 10.0))
    current = authz.store.current
    assert current is not None
    authz.store.current = ServedPolicies(current.istio, engine, current.version)
    response = authz.decide(check())
    assert response.status.code == DENIED
    assert (authz.record.reason, authz.record.engine) == ("timeout", "rego")
    assert authz.record.rego_error is not None
    assert authz.record.rego_error.startswith("timeout: the decision took longer than 0.1 s")
    assert authz.metric("meshward_rego_evaluations_total", outcome="timeout") == 1


def test_explained_denials_name_the_deciding_rule(make: Make) -> None:
    authz = make({"istio/p.yaml": CUSTOM_API, **rego(ALLOW_GETS)}, explain=True)
    response = authz.decide(check("POST"))
    assert response.denied_response.body == f"RBAC: access denied by {CUSTOM_ID}"


# -- dry-run --------------------------------------------------------------------------


def test_global_dry_run_allows_and_records_the_real_result(make: Make) -> None:
    authz = make({"istio/p.yaml": CUSTOM_API, **rego(CUSTOM_DENY)}, dry_run=True)
    response = authz.decide(check())
    assert response.status.code == OK
    # Nothing of the denial reaches Envoy but its metadata, as with OPA-Envoy's dry-run.
    assert len(response.ok_response.headers) == 1
    assert metadata(response) == {
        "why": "no token",
        "meshward_rego_dry_run_result": "denied",
        "meshward_rego_dry_run_reason": "denied_by_policy",
    }
    record = authz.record
    assert (record.allowed, record.reason, record.engine) == (True, "no_allow_policy", "istio")
    assert record.rego_enforced is False
    assert record.rego_result == {
        "allowed": False,
        "reason": "denied_by_policy",
        "http_status": 401,
    }
    assert record.dry_run == {
        "meshward_rego_dry_run_result": "denied",
        "meshward_rego_dry_run_reason": "denied_by_policy",
    }
    assert authz.metric("meshward_rego_evaluations_total", outcome="denied") == 1
    assert (
        authz.metric("meshward_authz_decisions_total", result="allow", reason="no_allow_policy")
        == 1
    )


def test_global_dry_run_keeps_an_allows_edits(make: Make) -> None:
    authz = make(rego(EDITS), mode="always", dry_run=True)
    response = authz.decide(check())
    assert [h.header.key for h in response.ok_response.headers][1:] == [
        "x-tags",
        "x-tags",
        "x-user",
    ]
    assert metadata(response)["meshward_rego_dry_run_result"] == "allowed"
    assert (authz.record.engine, authz.record.reason) == ("istio", "no_allow_policy")


def test_global_dry_run_does_not_lift_istio_denials(make: Make) -> None:
    authz = make(
        {"istio/p.yaml": CUSTOM_API + "---\n" + DENY_ADMIN, **rego(CUSTOM_DENY)}, dry_run=True
    )
    response = authz.decide(check("GET", "/api/admin"))
    assert response.status.code == DENIED
    assert (authz.record.engine, authz.record.policy_id) == ("istio", DENY_ADMIN_ID)


STAGED_SETUPS = [
    pytest.param(
        {"rego/envoy/authz/p.rego": READS_STAGED, "rego/envoy/staged/p.rego": STAGED_ANNOTATED},
        (),
        id="annotated",
    ),
    pytest.param(
        {"rego/envoy/authz/p.rego": READS_STAGED, "rego/envoy/staged/p.rego": STAGED},
        ("envoy.staged",),
        id="configured",
    ),
]


@pytest.mark.parametrize(("files", "configured"), STAGED_SETUPS)
def test_staged_package_is_shadowed_not_enforced(
    make: Make, files: dict[str, str], configured: tuple[str, ...]
) -> None:
    authz = make(files, dry_run_packages=configured, mode="always")
    response = authz.decide(check("DELETE", "/api/items/1"))
    assert response.status.code == OK
    record = authz.record
    assert (record.allowed, record.reason, record.engine) == (True, "allowed_by_policy", "rego")
    assert record.rego_enforced is True
    assert record.rego_result == {"allowed": True, "reason": "allowed_by_policy"}
    assert record.rego_shadow == {
        "allowed": False,
        "reason": "denied_by_policy",
        "http_status": 403,
        "dry_run_packages": ["envoy.staged"],
    }
    expected = {
        "meshward_rego_dry_run_shadow_result": "denied",
        "meshward_rego_dry_run_shadow_reason": "denied_by_policy",
        "meshward_rego_dry_run_packages": ["envoy.staged"],
    }
    assert metadata(response) == expected
    assert record.dry_run == expected

    # Where the staged package agrees, there is nothing to report.
    response = authz.decide(check("GET", "/api/items/1"))
    assert response.status.code == OK
    assert authz.record.rego_shadow is None
    assert metadata(response) == {}
    assert authz.metric("meshward_rego_evaluations_total", outcome="allowed") == 2


def test_the_decisions_own_package_in_dry_run_acts_as_global_dry_run(make: Make) -> None:
    authz = make(rego(ALLOW_GETS), dry_run_packages=("envoy.authz",), mode="always")
    response = authz.decide(check("POST"))
    assert response.status.code == OK
    record = authz.record
    assert record.rego_enforced is False
    assert (record.allowed, record.engine, record.reason) == (True, "istio", "no_allow_policy")
    assert record.rego_result == {
        "allowed": False,
        "reason": "denied_by_policy",
        "http_status": 403,
    }
    assert metadata(response) == {
        "meshward_rego_dry_run_result": "denied",
        "meshward_rego_dry_run_reason": "denied_by_policy",
        "meshward_rego_dry_run_packages": ["envoy.authz"],
    }


# -- the input ------------------------------------------------------------------------

READS_BODY = """\
package envoy.authz

allow := {"allowed": true, "headers": {"x-body": "parsed"}} if input.parsed_body.ok

allow := {"allowed": true, "headers": {"x-body": "absent"}} if not input.parsed_body
"""


@pytest.mark.parametrize(
    ("body", "seen", "body_error"),
    [
        ('{"ok": true}', "parsed", None),
        ('{"ok": tru', "absent", "invalid_json"),
    ],
)
def test_body_parse_failure_is_recorded_and_the_request_decided(
    make: Make, body: str, seen: str, body_error: str | None
) -> None:
    authz = make(rego(READS_BODY), mode="always")
    response = authz.decide(check("POST", headers={"content-type": "application/json"}, body=body))
    assert response.status.code == OK
    assert [h.header.value for h in response.ok_response.headers][1:] == [seen]
    assert authz.record.body_error == body_error


def test_body_is_not_parsed_when_turned_off(make: Make) -> None:
    authz = make(rego(READS_BODY), mode="always", parse_body=False)
    response = authz.decide(
        check("POST", headers={"content-type": "application/json"}, body='{"ok": true}')
    )
    assert [h.header.value for h in response.ok_response.headers][1:] == ["absent"]
    assert authz.record.body_error is None


def test_a_query_opa_envoy_cannot_read_denies_without_recording_it(make: Make) -> None:
    authz = make(rego(ALLOW_GETS), mode="always")
    response = authz.decide(check("GET", "/api/items?token=s3cret;x=%zz"))
    assert response.status.code == DENIED
    record = authz.record
    assert (record.reason, record.engine) == ("invalid_query", "error")
    assert "s3cret" not in json.dumps(asdict(record))


# -- reloads: one version for both engines --------------------------------------------


def test_reload_is_atomic_across_both_engines(make: Make, tmp_path: Path) -> None:
    authz = make({"istio/p.yaml": CUSTOM_API, **rego(ALLOW_GETS)})
    store = authz.store
    first = store.current
    assert first is not None
    authz.decide(check("POST"))
    assert (authz.record.allowed, authz.record.policy_set_version) == (False, first.version)

    # A broken module next to a valid Istio change: neither is served.
    write(tmp_path, {"istio/p.yaml": CUSTOM_API + "---\n" + DENY_ADMIN})
    write(tmp_path, {"rego/envoy/authz/policy.rego": "package envoy.authz\n\nallow := [1\n"})
    assert store.changed()
    assert not store.reload()
    assert store.current is first
    assert [(Path(i.file).name, i.line) for i in store.issues] == [("policy.rego", 4)]
    authz.decide(check("GET", "/api/admin"))
    assert (authz.record.allowed, authz.record.policy_set_version) == (True, first.version)

    # Fixed: both changes arrive together, under one new version.
    write(tmp_path, {"rego/envoy/authz/policy.rego": "package envoy.authz\n\nallow := true\n"})
    assert store.reload()
    second = store.current
    assert second is not None
    assert second.version != first.version
    authz.decide(check("POST", "/api/items"))
    assert (authz.record.allowed, authz.record.policy_set_version) == (True, second.version)
    authz.decide(check("GET", "/api/admin"))
    assert (authz.record.allowed, authz.record.policy_id) == (False, DENY_ADMIN_ID)
    assert authz.record.policy_set_version == second.version
