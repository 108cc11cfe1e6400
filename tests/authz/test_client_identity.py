"""Only listed SPIFFE IDs may call: the interceptor on a real mTLS grpc.aio server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import CollectorRegistry

from authz.client_identity import AllowedClients
from authz.workload_svid import SvidCredentials, identity_from_context
from tests.authz.svids import SERVER_NAME, Authority, Leaf

AUTHZ_ID = "spiffe://example.org/meshward/authz"
ENVOY_ID = "spiffe://example.org/ns/default/sa/envoy"
OTHER_ID = "spiffe://example.org/ns/default/sa/other"


@contextmanager
def channel(port: int, authority: Authority, client: Leaf) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(
        authority.roots_pem, client.key_pem, client.chain_pem
    )
    with grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    ) as opened:
        yield opened


def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def run_with_server(test: Any) -> tuple[Any, CollectorRegistry]:
    """Serve health (unary Check, streaming Watch) with mTLS and the interceptor; run ``test``."""
    authority = Authority()
    registry = CollectorRegistry()

    async def scenario() -> Any:
        credentials = SvidCredentials()
        credentials.update(identity_from_context(authority.context(AUTHZ_ID)))
        server = grpc.aio.server(interceptors=[AllowedClients([ENVOY_ID], registry=registry)])
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_secure_port("127.0.0.1:0", credentials.server_credentials())
        await server.start()
        try:
            return await asyncio.to_thread(test, port, authority)
        finally:
            await server.stop(0)

    return asyncio.run(scenario()), registry


def check(port: int, authority: Authority, client: Leaf) -> tuple[grpc.StatusCode, str]:
    with channel(port, authority, client) as opened:
        stub = health_pb2_grpc.HealthStub(opened)
        return outcome(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10))


def watch(port: int, authority: Authority, client: Leaf) -> tuple[grpc.StatusCode, str]:
    with channel(port, authority, client) as opened:
        stub = health_pb2_grpc.HealthStub(opened)
        return outcome(lambda: next(iter(stub.Watch(health_pb2.HealthCheckRequest(), timeout=10))))


def test_a_listed_client_is_served_on_unary_and_streaming_calls() -> None:
    def test(port: int, authority: Authority) -> Any:
        envoy = authority.leaf(ENVOY_ID)
        return check(port, authority, envoy), watch(port, authority, envoy)

    (unary, stream), _ = run_with_server(test)
    assert unary == (grpc.StatusCode.OK, "")
    assert stream == (grpc.StatusCode.OK, "")


@pytest.mark.parametrize("call", [check, watch], ids=["unary", "stream"])
def test_an_unlisted_spiffe_id_is_permission_denied(call: Any) -> None:
    def test(port: int, authority: Authority) -> Any:
        return call(port, authority, authority.leaf(OTHER_ID))

    (code, details), registry = run_with_server(test)
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert OTHER_ID in details
    assert (
        registry.get_sample_value("meshward_authz_clients_refused_total", {"reason": "not_allowed"})
        == 1
    )


def test_a_certificate_without_a_spiffe_id_is_unauthenticated() -> None:
    def test(port: int, authority: Authority) -> Any:
        return check(port, authority, authority.leaf(None, dns="envoy.example"))

    (code, details), registry = run_with_server(test)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "SPIFFE ID" in details
    assert (
        registry.get_sample_value(
            "meshward_authz_clients_refused_total", {"reason": "no_spiffe_id"}
        )
        == 1
    )
