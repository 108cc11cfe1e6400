"""`meshward authz` as a real process: Check over gRPC, health, reload, last good set, audit."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.processes import MESHWARD, cli_env, free_port

DEADLINE = 20.0
ALLOW_GET = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: ["example.org/ns/default/sa/productpage"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/reviews/{*}"]}}]
"""
DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lockdown, namespace: default}
spec:
  action: DENY
  rules: [{}]
"""


def check(principal: str, method: str, path: str) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attributes = request.attributes
    attributes.source.principal = principal
    attributes.source.address.socket_address.address = "10.0.0.7"
    attributes.destination.principal = "spiffe://example.org/ns/default/sa/reviews"
    attributes.destination.address.socket_address.address = "10.0.0.9"
    attributes.destination.address.socket_address.port_value = 9080
    attributes.request.http.method = method
    attributes.request.http.path = path
    attributes.request.http.host = "reviews.default.svc"
    attributes.context_extensions["namespace"] = "default"
    attributes.context_extensions["labels"] = "app=reviews,version=v1"
    return request


def wait_for(condition: Callable[[], Any], process: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        if result := condition():
            return result
        time.sleep(0.1)
    raise AssertionError(f"condition not met before the deadline\n{log.read_text()}")


@pytest.fixture
def authz(tmp_path: Path) -> Iterator[tuple[str, Path, Path, subprocess.Popen[bytes], Path]]:
    policies = tmp_path / "policies"
    (policies / "istio").mkdir(parents=True)
    (policies / "istio" / "reviews.yaml").write_text(ALLOW_GET)
    address = f"127.0.0.1:{free_port()}"
    log = tmp_path / "authz.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(MESHWARD),
                "authz",
                "--policies",
                str(policies),
                "--listen",
                address,
                "--trust-domain",
                "example.org",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(MESHWARD_AUTHZ__RELOAD_INTERVAL="200ms"),
        )
    try:
        yield address, policies, tmp_path / "data", process, log
    finally:
        process.terminate()
        assert process.wait(DEADLINE) == 0, log.read_text()


def test_decisions_health_reload_and_audit(
    authz: tuple[str, Path, Path, subprocess.Popen[bytes], Path],
) -> None:
    address, policies, data_dir, process, log = authz
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                return False
            return bool(status == health_pb2.HealthCheckResponse.SERVING)

        wait_for(serving, process, log)
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        productpage = "spiffe://example.org/ns/default/sa/productpage"

        allowed = stub.Check(check(productpage, "GET", "/reviews/1?x=y"), timeout=5)
        assert allowed.status.code == grpc.StatusCode.OK.value[0]
        decision_id = {h.header.key: h.header.value for h in allowed.ok_response.headers}[
            "x-meshward-decision-id"
        ]

        denied = stub.Check(check(productpage, "DELETE", "/reviews/1"), timeout=5)
        assert denied.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert denied.denied_response.status.code == 403
        assert denied.denied_response.body == "RBAC: access denied"

        stranger = stub.Check(
            check("spiffe://example.org/ns/default/sa/x", "GET", "/reviews/1"), timeout=5
        )
        assert stranger.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]

        # A broken file: the last good set keeps serving, nothing is half-loaded.
        (policies / "istio" / "broken.yaml").write_text("apiVersion: [\n")
        wait_for(lambda: "last good set keeps serving" in log.read_text(), process, log)
        again = stub.Check(check(productpage, "GET", "/reviews/2"), timeout=5)
        assert again.status.code == grpc.StatusCode.OK.value[0]

        # A valid change is picked up.
        (policies / "istio" / "broken.yaml").write_text(DENY_ALL)

        def locked_down() -> bool:
            response = stub.Check(check(productpage, "GET", "/reviews/3"), timeout=5)
            return bool(response.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0])

        wait_for(locked_down, process, log)

    audit = data_dir / "audit" / "decisions.jsonl"

    def written() -> list[dict[str, Any]] | None:
        # The sink writes in the background: wait for the last decision to be on disk.
        if not audit.exists():
            return None
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        done = any(r["policy_id"] == "default.lockdown[rules[0]]" for r in records)
        return records if done else None

    records = wait_for(written, process, log)
    first = next(r for r in records if r["decision_id"] == decision_id)
    assert first["allowed"] is True
    assert first["policy_id"] == "default.reviews-viewer[rules[0]]"
    assert first["path"] == "/reviews/1"
