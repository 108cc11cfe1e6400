"""The Envoy snippets in deploy/envoy/ load in the real Envoy, and match the tested bootstraps."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from meshward.envoy_bootstrap import (
    Upstream,
    client_bootstrap,
    server_bootstrap,
    sidecar_bootstrap,
)
from tests.e2e.envoys import ENVOY
from tests.e2e.processes import run_cli

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
SOCKET = Path("/run/meshward/agent.sock")


@pytest.mark.parametrize("name", ["sidecar-inbound.yaml", "sidecar-outbound.yaml", "sidecar.yaml"])
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
    with_authz = sidecar_bootstrap(
        workload="reviews",
        namespace="default",
        labels={"app": "reviews", "version": "v1"},
        service="reviews",
        agent_socket=SOCKET,
        authz_port=9191,
        authz_id="spiffe://example.org/meshward/authz",
        app_port=9080,
        outbound_port=15001,
        upstreams=[Upstream("ratings", 15006, "spiffe://example.org/ns/default/sa/ratings")],
        access_log="/dev/stdout",
    )
    assert yaml.safe_load((DEPLOY / "sidecar.yaml").read_text()) == with_authz


def test_envoy_bootstrap_command_prints_a_valid_sidecar(tmp_path: Path) -> None:
    printed = run_cli(
        "envoy",
        "bootstrap",
        "--workload",
        "reviews",
        "--namespace",
        "default",
        "--label",
        "app=reviews",
        "--label",
        "version=v1",
        "--service",
        "reviews",
        "--app-port",
        "9080",
        "--agent-socket",
        "/run/meshward/agent.sock",
    ).ok()
    config = tmp_path / "sidecar.yaml"
    config.write_text(printed.stdout)
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    bootstrap = yaml.safe_load(printed.stdout)
    inbound, outbound = bootstrap["static_resources"]["listeners"]
    assert (inbound["name"], outbound["name"]) == ("inbound", "outbound")
    manager = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.router",
    ]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    extensions = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]
    assert extensions["context_extensions"] == {
        "namespace": "default",
        "labels": "app=reviews,version=v1",
        "service": "reviews",
    }
    assert route["route"] == {"cluster": "app"}


def test_envoy_bootstrap_refuses_a_malformed_authz_spiffe_id() -> None:
    result = run_cli(
        "envoy",
        "bootstrap",
        "--workload",
        "r",
        "--namespace",
        "d",
        "--app-port",
        "1",
        "--authz-spiffe-id",
        "example.org/authz",
    )
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: Invalid value for --authz-spiffe-id: ")
    assert "spiffe://" in line


def test_envoy_bootstrap_refuses_a_malformed_label() -> None:
    result = run_cli(
        "envoy",
        "bootstrap",
        "--workload",
        "r",
        "--namespace",
        "d",
        "--label",
        "bad",
        "--app-port",
        "1",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: Invalid value for --label: 'bad' is not k=v"
    ]
