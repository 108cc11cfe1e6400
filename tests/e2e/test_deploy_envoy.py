"""The Envoy snippets in deploy/envoy/ load in the real Envoy, and match the tested bootstraps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.rbac_chain import CUSTOM_UNAVAILABLE_FILTER, EXTENSION_WITH_MATCHER, HTTP_CHAIN
from authz.rbac_translation import ENVOY_RUNTIME, Family, ext_authz_enabled_metadata
from meshward.envoy_bootstrap import (
    AuthzMode,
    Upstream,
    client_bootstrap,
    server_bootstrap,
    sidecar_bootstrap,
)
from meshward.envoy_telemetry import http_access_log, metrics_service_sink, rbac_passed_filter
from tests.e2e.envoys import ENVOY
from tests.e2e.processes import run_cli

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
SOCKET = Path("/run/meshward/agent.sock")


# The sidecar in each mode: hybrid is the CLI's default, so it keeps the plain name.
SIDECARS = {
    AuthzMode.HYBRID: "sidecar.yaml",
    AuthzMode.NATIVE: "sidecar-native.yaml",
    AuthzMode.EXT_AUTHZ: "sidecar-ext-authz.yaml",
}


@pytest.mark.parametrize(
    "name", ["sidecar-inbound.yaml", "sidecar-outbound.yaml", *SIDECARS.values()]
)
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
    for mode, name in SIDECARS.items():
        sidecar = sidecar_bootstrap(
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
            authz_mode=mode,
        )
        assert yaml.safe_load((DEPLOY / name).read_text()) == sidecar, name


def _validate(config: Path) -> None:
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _inbound_filters(bootstrap: dict[str, Any]) -> list[dict[str, Any]]:
    inbound = bootstrap["static_resources"]["listeners"][0]
    filters: list[dict[str, Any]] = inbound["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"
    ]
    return filters


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
    _validate(config)
    bootstrap = yaml.safe_load(printed.stdout)
    inbound, outbound = bootstrap["static_resources"]["listeners"]
    assert (inbound["name"], outbound["name"]) == ("inbound", "outbound")
    manager = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    # Hybrid by default: the RBAC chain from the agent, then ext_authz where CUSTOM says.
    chain, passed, ext_authz, router = manager["http_filters"]
    assert chain["name"] == HTTP_CHAIN
    # Marks what the chain let through, for the access-log receiver; ext_authz records
    # only what a CUSTOM policy sent it (and says so in its own metadata).
    assert passed == rbac_passed_filter()
    discovery = chain["config_discovery"]
    assert discovery["type_urls"] == [EXTENSION_WITH_MATCHER]
    assert discovery["config_source"]["api_config_source"]["grpc_services"] == [
        {"envoy_grpc": {"cluster_name": "meshward_agent"}}
    ]
    assert "default_config" not in discovery  # nothing serves before the chain arrives
    assert ext_authz["name"] == "envoy.filters.http.ext_authz"
    assert ext_authz["typed_config"]["filter_enabled_metadata"] == ext_authz_enabled_metadata(
        Family.HTTP
    )
    assert router["name"] == "envoy.filters.http.router"
    assert bootstrap["node"]["metadata"] == {
        "meshward.workload": {
            "namespace": "default",
            "labels": {"app": "reviews", "version": "v1"},
            "service": "reviews",
        },
        "meshward.authz_mode": "hybrid",
    }
    assert bootstrap["layered_runtime"]["layers"][0]["static_layer"] == dict(ENVOY_RUNTIME)
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    extensions = route["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"]
    assert extensions["context_extensions"] == {
        "namespace": "default",
        "labels": "app=reviews,version=v1",
        "service": "reviews",
    }
    assert route["route"] == {"cluster": "app"}
    # What the chain decided is reported to authz: the access-log and metrics services.
    assert http_access_log() in manager["access_log"]
    assert bootstrap["stats_sinks"] == [metrics_service_sink()]


PASSED = "meshward.rbac.passed"
BASE = ("envoy", "bootstrap", "--workload", "r", "--namespace", "d", "--app-port", "1")


@pytest.mark.parametrize(
    ("args", "filters", "clusters"),
    [
        pytest.param(
            ("--authz-mode", "native"),
            [HTTP_CHAIN, CUSTOM_UNAVAILABLE_FILTER, PASSED, "envoy.filters.http.router"],
            ["app", "meshward_agent", "meshward_authz"],  # authz receives the access log
            id="native",
        ),
        pytest.param(
            ("--authz-mode", "ext_authz"),
            ["envoy.filters.http.ext_authz", "envoy.filters.http.router"],
            ["app", "meshward_agent", "meshward_authz"],
            id="ext_authz",
        ),
        pytest.param(
            ("--rego-always",),
            [HTTP_CHAIN, PASSED, "envoy.filters.http.ext_authz", "envoy.filters.http.router"],
            ["app", "meshward_agent", "meshward_authz"],
            id="hybrid-rego-always",
        ),
    ],
)
def test_envoy_bootstrap_modes(
    tmp_path: Path, args: tuple[str, ...], filters: list[str], clusters: list[str]
) -> None:
    printed = run_cli(*BASE, *args).ok()
    config = tmp_path / "sidecar.yaml"
    config.write_text(printed.stdout)
    _validate(config)
    bootstrap = yaml.safe_load(printed.stdout)
    http_filters = _inbound_filters(bootstrap)
    assert [f["name"] for f in http_filters] == filters
    assert [c["name"] for c in bootstrap["static_resources"]["clusters"]] == clusters
    for f in http_filters:
        # Every request the chain allowed goes to ext_authz with --rego-always.
        assert "filter_enabled_metadata" not in f.get("typed_config", {})
    native_or_hybrid = HTTP_CHAIN in filters
    assert ("metadata" in bootstrap["node"]) is native_or_hybrid
    assert ("layered_runtime" in bootstrap) is native_or_hybrid
    assert ("stats_sinks" in bootstrap) is native_or_hybrid
    if PASSED in filters:
        (marker,) = (f for f in http_filters if f["name"] == PASSED)
        # With --rego-always ext_authz sees (and records) every request the chain passed.
        assert marker == rbac_passed_filter(ext_authz="--rego-always" in args)


@pytest.mark.parametrize("mode", ["native", "ext_authz"])
def test_rego_always_is_for_hybrid_only(mode: str) -> None:
    result = run_cli(*BASE, "--authz-mode", mode, "--rego-always")
    assert result.returncode == 2, result.describe()
    assert "--rego-always is for --authz-mode hybrid" in result.stderr


def test_values_envoy_would_read_as_booleans_stay_strings(tmp_path: Path) -> None:
    # PyYAML prints the string "y" bare, and Envoy's YAML reads a bare y as true: the
    # node id (a string field) would not load, a label would become a boolean.
    printed = run_cli(
        "envoy",
        "bootstrap",
        "--workload",
        "y",
        "--namespace",
        "n",
        "--label",
        "on=y",
        "--app-port",
        "1",
    ).ok()
    config = tmp_path / "sidecar.yaml"
    config.write_text(printed.stdout)
    _validate(config)
    assert 'id: "y"' in printed.stdout
    assert '"on": "y"' in printed.stdout


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


def test_log_header_keeps_a_header_of_envoys_decisions_but_never_a_credential() -> None:
    printed = run_cli(*BASE, "--log-header", "traceparent", "--format", "json").ok()
    manager = json.loads(printed.stdout)["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"
    ][0]["typed_config"]
    assert http_access_log(request_headers=["traceparent"]) in manager["access_log"]
    refused = run_cli(*BASE, "--log-header", "Cookie")
    assert refused.returncode == 2, refused.describe()
    assert "--log-header: Cookie: a credential is never sent to the audit trail" in refused.stderr
    assert "Traceback" not in refused.stderr
