"""An audit store filled by the real servicer: decisions on a policy directory, shipped.

For tests (and the benchmark) that need decisions as `meshward authz` records them,
with request snapshots and the policy set kept, without starting Envoy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from audit.record import DecisionRecord
from audit.redaction import Redaction
from audit.shipper import Shipper
from audit.sink import MemorySink
from audit.spool import KIND_POLICY_SET, SpoolWriter
from audit.store import queries
from audit.store.database import AuditDatabase, sqlite_url
from audit.store.ingest import encode_policy_set_files
from audit.store.queries import Filters
from authz.policy_store import ServedPolicies
from authz.request_test_file import Destination, RequestUnderTest
from authz.request_tests import build_check_request
from meshward.audit_tools import replay_decisions
from meshward.authz_audit import served_settings
from meshward.authz_runtime import build_authz
from meshward.config import Config, load_config

__all__ = [
    "ADMIN_REQUESTS",
    "REQUESTS",
    "SETTINGS_FLAGS",
    "SETTINGS_REQUESTS",
    "admin_request",
    "config_for",
    "decide_into_store",
    "replay_store",
    "request",
    "settings_policies",
    "stored_decisions",
]


def config_for(data_dir: Path, flags: Mapping[str, Any] | None = None) -> Config:
    """The config of `meshward authz` in these tests: ``flags`` are dotted keys
    (``{"audit.store_body": True}``) over trust domain example.org."""
    return load_config(
        None,
        env={},
        flags={"trust_domain": "example.org", "data_dir": data_dir, **(flags or {})},
    )


def request(
    source: str, method: str, path: str, workload: str, **headers: str
) -> external_auth_pb2.CheckRequest:
    return build_check_request(
        RequestUnderTest(
            path=path,
            method=method,
            principal=f"spiffe://example.org/ns/default/sa/{source}",
            headers=headers,
            destination=Destination(
                namespace="default", labels={"app": workload}, service=workload
            ),
        )
    )


TRACE = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
# Against the sample policies/: 28 allowed, 12 denied, 6 that the staged
# reviews-require-trace would deny.
REQUESTS = [
    *(request("frontend", "GET", f"/reviews/{i}", "reviews", **TRACE) for i in range(12)),
    *(request("frontend", "GET", f"/reviews/{i}", "reviews") for i in range(6)),
    *(request("frontend", "DELETE", f"/reviews/{i}", "reviews", **TRACE) for i in range(4)),
    *(request("reviews", "GET", f"/ratings/{i}", "ratings") for i in range(8)),
    *(request("reviews", "POST", f"/ratings/{i}", "ratings") for i in range(3)),
    *(request("admin", "DELETE", f"/ratings/{i}", "ratings") for i in range(2)),
    *(request("frontend", "GET", "/debug", "reviews", **TRACE) for _ in range(5)),
]


def admin_request(
    method: str,
    path: str,
    *,
    user: str | None = None,
    amr: tuple[str, ...] = ("pwd",),
    source: str | None = "frontend",
) -> external_auth_pb2.CheckRequest:
    """A request to the sample's admin console, which Rego decides (policies/istio/admin.yaml):
    ``user`` sends a bearer token for that ``sub``, ``source`` None no client certificate."""
    return build_check_request(
        RequestUnderTest(
            path=path,
            method=method,
            principal=None if source is None else f"spiffe://example.org/ns/default/sa/{source}",
            bearer=None if user is None else {"sub": user, "amr": list(amr)},
            destination=Destination(namespace="default", labels={"app": "admin"}, service="admin"),
        )
    )


# Against the sample policies/, in order: Rego allows bob to read users (3; the ALLOW
# layer then has the last word), Rego denies bob a delete (2, 403) and every request
# without a token (2 + 2, 401), the health check never reaches Rego (2), and alice's
# delete without multi-factor login passes while the staged mfa package would deny it.
ADMIN_REQUESTS = [
    *(admin_request("GET", "/admin/users", user="bob") for _ in range(3)),
    *(admin_request("DELETE", "/admin/users/7", user="bob", amr=("mfa",)) for _ in range(2)),
    *(admin_request("GET", "/admin/users") for _ in range(2)),
    *(admin_request("GET", f"/admin/public/{i}") for i in range(2)),
    *(admin_request("GET", "/healthz", source=None) for _ in range(2)),
    admin_request("DELETE", "/admin/users/8", user="alice"),
]


# A policy set whose decisions depend on the authz settings it is served with: its ALLOW
# names the frontend in the trust domain alias old.example.org, and its Rego, which runs on
# every request only in mode "always", denies deletes. Served with SETTINGS_FLAGS, the
# frontend's reads are allowed (3) and the ops tool's deletes denied by Rego (2); with
# the defaults, each of them the other way.
SETTINGS_FLAGS = {"authz.trust_domain_aliases": ["old.example.org"], "authz.rego.mode": "always"}
_SETTINGS_ISTIO = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-callers, namespace: default}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["old.example.org/ns/default/sa/frontend"]}}]
  - from: [{source: {namespaces: ["ops"]}}]
"""
_SETTINGS_REGO = """\
package envoy.authz

default allow := true

allow := false if input.attributes.request.http.method == "DELETE"
"""


def settings_policies(root: Path) -> Path:
    """The policy set of SETTINGS_FLAGS, written under ``root``."""
    (root / "istio").mkdir(parents=True)
    (root / "istio" / "api.yaml").write_text(_SETTINGS_ISTIO)
    (root / "rego" / "envoy" / "authz").mkdir(parents=True)
    (root / "rego" / "envoy" / "authz" / "policy.rego").write_text(_SETTINGS_REGO)
    return root


def _api_request(principal: str, method: str, path: str) -> external_auth_pb2.CheckRequest:
    return build_check_request(
        RequestUnderTest(
            path=path,
            method=method,
            principal=principal,
            destination=Destination(namespace="default", labels={"app": "api"}, service="api"),
        )
    )


SETTINGS_REQUESTS = [
    *(
        _api_request("spiffe://example.org/ns/default/sa/frontend", "GET", f"/api/items/{i}")
        for i in range(3)
    ),
    *(
        _api_request("spiffe://example.org/ns/ops/sa/tool", "DELETE", f"/api/items/{i}")
        for i in range(2)
    ),
]


def decide_into_store(
    policies: Path,
    data_dir: Path,
    requests: Iterable[external_auth_pb2.CheckRequest] = REQUESTS,
    *,
    url: str | None = None,
    flags: Mapping[str, Any] | None = None,
) -> list[DecisionRecord]:
    """Decide ``requests`` on ``policies`` as `meshward authz` does, into ``url`` (default
    the data dir's SQLite store); the records, in order. ``flags`` are config keys
    (see ``config_for``): the authz settings, and what the audit trail redacts."""
    config = config_for(data_dir, flags)
    audit = config.audit
    spool = SpoolWriter(data_dir / "audit" / "spool")
    memory = MemorySink()

    class Both:
        def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
            memory.submit(record, request)
            return spool.submit(record, request)

    def served(policy_set: ServedPolicies) -> None:
        document = {
            "version": policy_set.version,
            "time_us": time.time_ns() // 1000,
            "files": encode_policy_set_files(policy_set.sources),
            "settings": served_settings(config),
        }
        spool.append(KIND_POLICY_SET, orjson.dumps(document))

    store, servicer = build_authz(
        config,
        policies=policies,
        sink=Both(),
        registry=CollectorRegistry(),
        redaction=Redaction.build(
            b"k" * 32,
            headers=audit.redact_headers,
            query_parameters=audit.redact_query_parameters,
            store_body=audit.store_body,
            max_body_bytes=audit.max_body_bytes,
        ),
        on_served=served,
    )
    store.reload()
    for check in requests:
        servicer.decide(check)
    spool.close()
    db = AuditDatabase(url or sqlite_url(data_dir))
    db.migrate()
    Shipper(data_dir / "audit" / "spool", db).drain()
    db.dispose()
    return memory.records


def stored_decisions(url: str) -> list[dict[str, Any]]:
    """Every decision in the store at ``url``, newest first, with its request snapshot
    (bytes or None): what ``meshward policy replay`` gets from the export."""
    db = AuditDatabase(url, read_only=True)
    try:
        with db.engine.connect() as conn:
            return list(
                queries.iter_decisions(conn, Filters.parse({}, now_us=0), with_request=True)
            )
    finally:
        db.dispose()


def replay_store(
    url: str,
    config: Config,
    candidate: Path,
    *,
    recorded: bool = True,
    overrides: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """The report of replaying every decision in the store at ``url`` against
    ``candidate``, each under the settings its policy set was served with, as the store
    keeps them (``recorded`` False: under ``config`` alone)."""
    decisions = stored_decisions(url)
    db = AuditDatabase(url, read_only=True)
    try:
        with db.engine.connect() as conn:
            return replay_decisions(
                config,
                candidate,
                decisions,
                recorded=(lambda v: queries.policy_set_settings(conn, v)) if recorded else None,
                overrides=overrides,
                limit=limit,
            )
    finally:
        db.dispose()
