"""The Envoy snippets in deploy/envoy/ load in the real Envoy, and match the tested bootstraps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e.envoy import client_bootstrap, server_bootstrap
from tests.e2e.envoys import ENVOY

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
SOCKET = Path("/run/meshward/agent.sock")


@pytest.mark.parametrize("name", ["sidecar-inbound.yaml", "sidecar-outbound.yaml"])
def test_snippet_is_a_valid_envoy_config(name: str) -> None:
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(DEPLOY / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_snippets_are_the_bootstraps_the_end_to_end_tests_run() -> None:
    # The e2e tests prove these shapes work with the agent; the snippets must not drift.
    inbound = server_bootstrap(
        node_id="reviews",
        agent_socket=SOCKET,
        client_id="spiffe://example.org/ns/default/sa/productpage",
        listen_port=15006,
        admin_port=15000,
    )
    outbound = client_bootstrap(
        node_id="productpage",
        agent_socket=SOCKET,
        upstream_port=15006,
        server_id="spiffe://example.org/ns/default/sa/reviews",
        listen_port=15001,
        admin_port=15000,
    )
    assert yaml.safe_load((DEPLOY / "sidecar-inbound.yaml").read_text()) == inbound
    assert yaml.safe_load((DEPLOY / "sidecar-outbound.yaml").read_text()) == outbound
