"""ECDS on a real grpc.aio server: state of the world, delta and fetch, with a source the test drives.

Each table row is one exchange: what the Envoy sends (or which generation the source
publishes) and what it must get back. "Nothing" is shown the way the SDS tests show it:
the next thing the stream receives is the answer to a later event that must push.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.extension.v3 import config_discovery_pb2_grpc

from identity.ecds import EXTENSION_CONFIG_TYPE_URL, EXTENSION_CONFIGS, extension_version
from identity.errors import InvalidInputError
from identity.extension_configs import EnvoyWorkload, envoy_workload
from tests.identity.ecds_server import DEADLINE, EcdsServer
from tests.identity.xds_call import XdsCall

CHAIN = "meshward.rbac.http"


def config(marker: str, name: str = CHAIN) -> extension_pb2.TypedExtensionConfig:
    """A config whose content is told apart by ``marker``."""
    out = extension_pb2.TypedExtensionConfig(name=name)
    out.typed_config.Pack(rbac_pb2.RBAC(rules_stat_prefix=marker))
    return out


def markers(response: Any) -> dict[str, str]:
    """Resource name -> marker of what a SotW or delta response holds."""
    out = {}
    packed = response.resources
    for item in packed:
        any_config = item.resource if isinstance(item, discovery_pb2.Resource) else item
        tec = extension_pb2.TypedExtensionConfig()
        assert any_config.Unpack(tec)
        rbac = rbac_pb2.RBAC()
        assert tec.typed_config.Unpack(rbac)
        out[tec.name] = rbac.rules_stat_prefix
    return out


def node(namespace: str | None = "default", node_id: str = "reviews-1", **workload: Any) -> Any:
    out = base_pb2.Node(id=node_id)
    if namespace is not None:
        out.metadata.update(
            {
                "meshward.workload": {
                    "namespace": namespace,
                    "labels": {"app": "reviews"},
                    **workload,
                }
            }
        )
    return out


def request(
    *names: str,
    version: str = "",
    nonce: str = "",
    error: str | None = None,
    namespace: str | None = "default",
    node_id: str = "reviews-1",
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        version_info=version,
        resource_names=list(names),
        type_url=EXTENSION_CONFIG_TYPE_URL,
        response_nonce=nonce,
        node=node(namespace, node_id),
    )
    if error is not None:
        req.error_detail.message = error
    return req


def delta(
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    *,
    nonce: str = "",
    error: str | None = None,
    initial: Mapping[str, str] | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=EXTENSION_CONFIG_TYPE_URL,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=dict(initial or {}),
        node=node(),
    )
    if error is not None:
        req.error_detail.message = error
    return req


class Call(XdsCall):
    def __init__(self, channel: grpc.Channel, method: str = "StreamExtensionConfigs") -> None:
        super().__init__(
            getattr(config_discovery_pb2_grpc.ExtensionConfigDiscoveryServiceStub(channel), method),
            timeout=DEADLINE,
        )


@pytest.fixture
def server() -> Iterator[EcdsServer]:
    root = Path(tempfile.mkdtemp(prefix="meshward-ecds-"))
    ecds = EcdsServer(root / "ecds.sock")
    ecds.publish({"default": {CHAIN: config("v1")}, "prod": {CHAIN: config("p1")}})
    yield ecds
    ecds.close()
    shutil.rmtree(root)


@pytest.fixture
def channel(server: EcdsServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{server.socket}") as ch:
        yield ch


def envoys(server: EcdsServer) -> list[dict[str, Any]]:
    return server.run(lambda: [e.as_json() for e in server.servicer.stats.open_streams()])


def wait_for(condition: Any) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.02)


# -- node metadata --------------------------------------------------------------------------


def test_the_workload_comes_from_the_node_metadata() -> None:
    assert envoy_workload(node("prod", service="api")) == EnvoyWorkload(
        "prod", (("app", "reviews"),), "api"
    )


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        pytest.param({}, "has no meshward.workload", id="missing"),
        pytest.param({"meshward.workload": "default"}, "must be a map", id="not-a-map"),
        pytest.param({"meshward.workload": {"labels": {}}}, "namespace is missing", id="no-ns"),
        pytest.param(
            {"meshward.workload": {"namespace": "d", "labels": {"canary": True}}},
            "labels.canary is a boolean (YAML reads an unquoted y",
            id="label-read-as-a-boolean",
        ),
        pytest.param(
            {"meshward.workload": {"namespace": "d", "ports": [80]}},
            "unknown keys ['ports']",
            id="unknown-key",
        ),
    ],
)
def test_node_metadata_that_names_no_workload_is_refused(
    metadata: dict[str, Any], message: str
) -> None:
    bad = base_pb2.Node(id="x")
    bad.metadata.update(metadata)
    with pytest.raises(InvalidInputError) as info:
        envoy_workload(bad)
    assert message in info.value.message


# -- state of the world --------------------------------------------------------------------


def test_first_request_gets_the_workloads_configs_and_an_ack_gets_nothing(
    server: EcdsServer, channel: grpc.Channel
) -> None:
    call = Call(channel).send(request(CHAIN))
    try:
        first = call.recv()
        assert markers(first) == {CHAIN: "v1"}
        assert first.type_url == EXTENSION_CONFIG_TYPE_URL
        assert first.version_info == EXTENSION_CONFIGS.collection_version({CHAIN: config("v1")})
        call.send(request(CHAIN, version=first.version_info, nonce=first.nonce))  # ACK
        wait_for(lambda: envoys(server)[0]["version"] == first.version_info)
        (envoy,) = envoys(server)
        assert envoy["envoy"] == "reviews-1"
        assert envoy["workload"]["namespace"] == "default"
        # The ACK got no answer: the next response is the next generation's.
        server.publish({"default": {CHAIN: config("v2")}})
        assert markers(call.recv()) == {CHAIN: "v2"}
    finally:
        call.close()


def test_a_generation_pushes_only_to_the_envoys_whose_configs_changed(
    server: EcdsServer, channel: grpc.Channel
) -> None:
    default = Call(channel).send(request(CHAIN))
    prod = Call(channel).send(request(CHAIN, namespace="prod", node_id="api-1"))
    twin = Call(channel).send(request(CHAIN, node_id="reviews-2"))
    try:
        first = default.recv()
        assert markers(first) == {CHAIN: "v1"}
        prod_first = prod.recv()
        assert markers(prod_first) == {CHAIN: "p1"}
        # A version names the content: the same for every Envoy of one workload.
        assert twin.recv().version_info == first.version_info != prod_first.version_info
        twin.close()
        # Only prod's chain changes: default's Envoy hears nothing of it...
        server.publish({"default": {CHAIN: config("v1")}, "prod": {CHAIN: config("p2")}})
        assert markers(prod.recv()) == {CHAIN: "p2"}
        # ...so what it gets next is its own change, and prod's Envoy gets nothing then.
        server.publish({"default": {CHAIN: config("v2")}, "prod": {CHAIN: config("p2")}})
        assert markers(default.recv()) == {CHAIN: "v2"}
        server.publish({"default": {CHAIN: config("v2")}, "prod": {CHAIN: config("p3")}})
        assert markers(prod.recv()) == {CHAIN: "p3"}
        wait_for(lambda: server.servicer.stats.responses == 6)
    finally:
        default.close()
        prod.close()


def test_a_nack_keeps_the_last_good_version_is_not_resent_and_is_reported(
    server: EcdsServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    call = Call(channel).send(request(CHAIN))
    try:
        first = call.recv()
        call.send(request(CHAIN, version=first.version_info, nonce=first.nonce))
        wait_for(lambda: envoys(server)[0]["version"] == first.version_info)
        server.publish({"default": {CHAIN: config("bad")}})
        bad = call.recv()
        with caplog.at_level(logging.WARNING, logger="identity.ecds"):
            call.send(request(CHAIN, version=first.version_info, nonce=bad.nonce, error="no"))
            wait_for(lambda: server.servicer.stats.nacks == 1)
        (envoy,) = envoys(server)
        assert envoy["version"] == first.version_info  # what the Envoy keeps
        assert envoy["rejected"] == {"version": bad.version_info, "message": "no"}
        (line,) = [r.getMessage() for r in caplog.records]
        assert "reviews-1" in line
        assert bad.version_info in line
        # The same content again is not sent; a fix is, and its ACK clears the report.
        server.publish({"default": {CHAIN: config("bad")}})
        server.publish({"default": {CHAIN: config("fixed")}})
        fixed = call.recv()
        assert markers(fixed) == {CHAIN: "fixed"}
        call.send(request(CHAIN, version=fixed.version_info, nonce=fixed.nonce))
        wait_for(lambda: "rejected" not in envoys(server)[0])
    finally:
        call.close()


def test_a_rejected_version_is_logged_once_per_envoy(
    server: EcdsServer, channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="identity.ecds"):
        for attempt in range(2):  # the Envoy reconnects and rejects the same version again
            call = Call(channel).send(request(CHAIN))
            first = call.recv()
            call.send(request(CHAIN, nonce=first.nonce, error="refused"))
            wait_for(lambda a=attempt: server.servicer.stats.nacks == a + 1)
            call.close()
    assert len([r for r in caplog.records if "rejected" in r.getMessage()]) == 1


def test_a_reconnecting_envoy_that_has_the_current_version_gets_no_repeat(
    server: EcdsServer, channel: grpc.Channel
) -> None:
    call = Call(channel).send(request(CHAIN))
    first = call.recv()
    call.close()
    wait_for(lambda: envoys(server) == [])  # the stream's record goes with it
    again = Call(channel).send(request(CHAIN, version=first.version_info))
    try:
        wait_for(lambda: len(envoys(server)) == 1)
        server.publish({"default": {CHAIN: config("v2")}})
        assert markers(again.recv()) == {CHAIN: "v2"}
    finally:
        again.close()


def test_a_generation_the_workload_cannot_get_is_not_pushed_and_is_reported(
    server: EcdsServer, channel: grpc.Channel
) -> None:
    call = Call(channel).send(request(CHAIN))
    try:
        first = call.recv()
        call.send(request(CHAIN, version=first.version_info, nonce=first.nonce))
        wait_for(lambda: envoys(server)[0]["version"] == first.version_info)
        server.publish({}, {"default": "policies/istio/x.yaml[0]: cannot be enforced"})
        wait_for(lambda: "not_updated" in envoys(server)[0])
        (envoy,) = envoys(server)
        assert envoy["not_updated"] == "policies/istio/x.yaml[0]: cannot be enforced"
        assert envoy["version"] == first.version_info  # it keeps the last good chain
        # A request on that stream now (a late ACK) is not a reason to end it either.
        call.send(request(CHAIN, version=first.version_info, nonce=first.nonce))
        wait_for(lambda: server.servicer.stats.refused == 0 and len(envoys(server)) == 1)
        server.publish({"default": {CHAIN: config("v2")}})
        assert markers(call.recv()) == {CHAIN: "v2"}
        wait_for(lambda: "not_updated" not in envoys(server)[0])
    finally:
        call.close()


def ask(channel: grpc.Channel, method: str, req: Any) -> Any:
    """The first answer of ``method`` to ``req``: a response, or the call's error."""
    if method == "FetchExtensionConfigs":
        stub = config_discovery_pb2_grpc.ExtensionConfigDiscoveryServiceStub(channel)
        return stub.FetchExtensionConfigs(req, timeout=DEADLINE)
    call = Call(channel).send(req)
    try:
        return call.recv()
    finally:
        call.close()


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        pytest.param(
            {"namespace": None},
            grpc.StatusCode.INVALID_ARGUMENT,
            "has no meshward.workload",
            id="no-workload",
        ),
        pytest.param(
            {"names": ("meshward.rbac.tcp",)},
            grpc.StatusCode.INVALID_ARGUMENT,
            "no extension config named 'meshward.rbac.tcp'; this agent serves 'meshward.rbac.http'",
            id="unknown-name",
        ),
        pytest.param(
            {"namespace": "broken"},
            grpc.StatusCode.FAILED_PRECONDITION,
            "ecds: x.yaml[0]: spec.rules[0]: cannot be enforced",
            id="translation-fails",
        ),
        pytest.param(
            {"type_url": "type.googleapis.com/envoy.config.cluster.v3.Cluster"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "this service serves type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
            id="wrong-type",
        ),
    ],
)
@pytest.mark.parametrize("method", ["StreamExtensionConfigs", "FetchExtensionConfigs"])
def test_a_request_that_cannot_be_answered_ends_with_a_status_that_says_why(
    server: EcdsServer,
    channel: grpc.Channel,
    change: dict[str, Any],
    code: grpc.StatusCode,
    message: str,
    method: str,
) -> None:
    server.publish(
        {"default": {CHAIN: config("v1")}},
        {"broken": "x.yaml[0]: spec.rules[0]: cannot be enforced"},
    )
    req = request(*change.get("names", (CHAIN,)), namespace=change.get("namespace", "default"))
    if "type_url" in change:
        req.type_url = change["type_url"]
    with pytest.raises(grpc.RpcError) as failure:
        ask(channel, method, req)
    assert failure.value.code() == code
    assert message in str(failure.value.details())
    assert server.servicer.stats.responses == 0


@pytest.mark.parametrize(
    ("setup", "code", "message"),
    [
        pytest.param("unattested", grpc.StatusCode.UNAUTHENTICATED, "refuses", id="unattested"),
        pytest.param(
            "no-entry", grpc.StatusCode.PERMISSION_DENIED, "no registration entry", id="no-entry"
        ),
    ],
)
def test_only_registered_workloads_may_ask(
    server: EcdsServer, channel: grpc.Channel, setup: str, code: grpc.StatusCode, message: str
) -> None:
    server.attestor.refuse = setup == "unattested"
    server.entitlement.entitled = setup != "no-entry"
    call = Call(channel).send(request(CHAIN))
    with pytest.raises(grpc.RpcError) as failure:
        call.recv()
    call.close()
    assert failure.value.code() == code
    assert message in str(failure.value.details())
    assert server.servicer.stats.denied == 1


def test_an_agent_without_a_source_says_how_to_configure_one() -> None:
    root = Path(tempfile.mkdtemp(prefix="meshward-ecds-"))
    ecds = EcdsServer(root / "ecds.sock", configured=False)
    try:
        with grpc.insecure_channel(f"unix:{ecds.socket}") as channel:
            call = Call(channel).send(request(CHAIN))
            with pytest.raises(grpc.RpcError) as failure:
                call.recv()
            call.close()
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert failure.value.details() == "ecds: no policies for the test"
    finally:
        ecds.close()
        shutil.rmtree(root)


# -- delta ---------------------------------------------------------------------------------


def test_delta_sends_each_config_with_its_version_and_only_what_changed(
    server: EcdsServer, channel: grpc.Channel
) -> None:
    two = {"default": {CHAIN: config("v1"), "other": config("o1", "other")}}
    server.publish(two)
    call = Call(channel, "DeltaExtensionConfigs").send(delta((CHAIN, "other")))
    try:
        first = call.recv()
        assert markers(first) == {CHAIN: "v1", "other": "o1"}
        assert {r.name: r.version for r in first.resources} == {
            CHAIN: extension_version(config("v1")),
            "other": extension_version(config("o1", "other")),
        }
        call.send(delta(nonce=first.nonce))  # ACK
        wait_for(lambda: envoys(server)[0]["version"] == first.system_version_info)
        server.publish({"default": {CHAIN: config("v2"), "other": config("o1", "other")}})
        second = call.recv()
        assert markers(second) == {CHAIN: "v2"}  # the unchanged one is not sent again
        # A NACK: not resent; the next change is.
        call.send(delta(nonce=second.nonce, error="refused"))
        wait_for(lambda: server.servicer.stats.nacks == 1)
        assert envoys(server)[0]["rejected"]["message"] == "refused"
        call.send(delta(unsubscribe=("other",)))
        wait_for(
            lambda: (
                server.run(lambda: server.servicer.stats.open_streams()[0].stream.subscribed)
                == (CHAIN,)
            )
        )
        server.publish({"default": {CHAIN: config("v3"), "other": config("o2", "other")}})
        assert markers(call.recv()) == {CHAIN: "v3"}
    finally:
        call.close()


def test_delta_initial_versions_that_are_current_are_not_resent(
    server: EcdsServer, channel: grpc.Channel
) -> None:
    current = {CHAIN: extension_version(config("v1"))}
    call = Call(channel, "DeltaExtensionConfigs").send(delta((CHAIN,), initial=current))
    try:
        wait_for(lambda: len(envoys(server)) == 1)
        server.publish({"default": {CHAIN: config("v2")}})
        assert markers(call.recv()) == {CHAIN: "v2"}
    finally:
        call.close()


# -- fetch ---------------------------------------------------------------------------------


def test_fetch_returns_the_current_configs(server: EcdsServer, channel: grpc.Channel) -> None:
    stub = config_discovery_pb2_grpc.ExtensionConfigDiscoveryServiceStub(channel)
    response = stub.FetchExtensionConfigs(request(), timeout=DEADLINE)  # no names: all
    assert markers(response) == {CHAIN: "v1"}
    assert response.version_info == EXTENSION_CONFIGS.collection_version({CHAIN: config("v1")})
