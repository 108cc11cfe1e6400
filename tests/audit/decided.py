"""An audit store filled by the real servicer: decisions on a policy directory, shipped.

For tests (and the benchmark) that need decisions as `meshward authz` records them,
with request snapshots and the policy set kept, without starting Envoy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import orjson
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from audit.record import DecisionRecord
from audit.redaction import Redaction
from audit.shipper import Shipper
from audit.sink import MemorySink
from audit.spool import KIND_POLICY_SET, SpoolWriter
from audit.store.database import AuditDatabase, sqlite_url
from audit.store.ingest import encode_policy_set_files
from authz.policy_store import ServedPolicies
from authz.request_test_file import Destination, RequestUnderTest
from authz.request_tests import build_check_request
from meshward.authz_audit import served_settings
from meshward.authz_runtime import build_authz
from meshward.config import Config, load_config

__all__ = ["REQUESTS", "config_for", "decide_into_store", "request"]


def config_for(data_dir: Path) -> Config:
    return load_config(None, env={}, flags={"trust_domain": "example.org", "data_dir": data_dir})


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


def decide_into_store(
    policies: Path,
    data_dir: Path,
    requests: Iterable[external_auth_pb2.CheckRequest] = REQUESTS,
    *,
    url: str | None = None,
) -> list[DecisionRecord]:
    """Decide ``requests`` on ``policies`` as `meshward authz` does, into ``url`` (default
    the data dir's SQLite store); the records, in order."""
    config = config_for(data_dir)
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
        redaction=Redaction.build(b"k" * 32),
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
