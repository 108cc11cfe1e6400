"""The authz server's own SVID: turned into gRPC credentials, rotated per handshake, re-fetched.

The credentials are served by a real grpc.aio server on loopback and checked from the
client side with Python's ``ssl`` and grpc clients; the Workload API watcher is driven
by a scripted stand-in for py-spiffe's client (the end-to-end tests use the real agent).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from authz.workload_svid import (
    ServingIdentity,
    SvidCredentials,
    WorkloadSvidWatcher,
    identity_from_context,
)
from tests.authz.svids import SERVER_NAME, Authority, Leaf, served_certificate

AUTHZ_ID = "spiffe://example.org/meshward/authz"
CLIENT_ID = "spiffe://example.org/ns/default/sa/envoy"
DEADLINE = 20.0  # keeps a broken run from hanging; nothing asserts durations


@pytest.fixture
def authority() -> Authority:
    return Authority()


@asynccontextmanager
async def tls_server(credentials: SvidCredentials) -> Any:
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_secure_port("127.0.0.1:0", credentials.server_credentials())
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


def health_check(port: int, roots_pem: bytes, client: Leaf | None) -> grpc.StatusCode:
    credentials = (
        grpc.ssl_channel_credentials(roots_pem, client.key_pem, client.chain_pem)
        if client
        else grpc.ssl_channel_credentials(roots_pem)
    )
    with grpc.secure_channel(
        f"127.0.0.1:{port}", credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    ) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_identity_from_a_workload_api_context(authority: Authority) -> None:
    identity = identity_from_context(authority.context(AUTHZ_ID))

    assert identity.spiffe_id == AUTHZ_ID
    assert identity.roots_pem == authority.roots_pem
    assert identity.chain_pem.count(b"BEGIN CERTIFICATE") == 1
    assert b"PRIVATE KEY" in identity.key_pem
    # Whatever logs or prints an identity never shows the key.
    assert "PRIVATE" not in repr(identity)
    assert "key_pem" not in repr(identity)


def test_an_identity_needs_a_chain_a_key_and_roots() -> None:
    with pytest.raises(ValueError, match="needs a chain"):
        ServingIdentity(
            spiffe_id=AUTHZ_ID,
            serial=1,
            not_after=None,  # type: ignore[arg-type]
            chain_pem=b"x",
            roots_pem=b"",
            key_pem=b"k",
        )


def test_no_credentials_before_the_first_svid() -> None:
    # Serving plaintext (or nothing verifiable) while the SVID is missing must be impossible.
    with pytest.raises(RuntimeError, match="no X509-SVID yet"):
        SvidCredentials().server_credentials()


def test_a_new_svid_or_bundle_is_served_from_the_next_handshake(authority: Authority) -> None:
    client = authority.leaf(CLIENT_ID)
    first = identity_from_context(authority.context(AUTHZ_ID))
    second = identity_from_context(authority.context(AUTHZ_ID))
    successor = Authority()  # a new root, as after a CA rotation in the bundle
    moved = identity_from_context(successor.context(AUTHZ_ID))

    async def scenario() -> None:
        credentials = SvidCredentials()
        credentials.update(first)
        async with tls_server(credentials) as port:
            seen = await asyncio.to_thread(served_certificate, port, client, authority.roots_pem)
            assert seen.serial_number == first.serial
            assert await asyncio.to_thread(health_check, port, authority.roots_pem, client) == (
                grpc.StatusCode.OK
            )

            credentials.update(second)
            seen = await asyncio.to_thread(served_certificate, port, client, authority.roots_pem)
            assert seen.serial_number == second.serial

            # The client roots follow the bundle too: the old root's clients are out.
            credentials.update(moved)
            newcomer = successor.leaf(CLIENT_ID)
            assert await asyncio.to_thread(health_check, port, successor.roots_pem, newcomer) == (
                grpc.StatusCode.OK
            )
            assert await asyncio.to_thread(health_check, port, successor.roots_pem, client) == (
                grpc.StatusCode.UNAVAILABLE
            )

    asyncio.run(scenario())


def test_clients_without_a_certificate_or_from_another_root_never_get_through(
    authority: Authority,
) -> None:
    stranger = Authority()

    async def scenario() -> None:
        credentials = SvidCredentials()
        credentials.update(identity_from_context(authority.context(AUTHZ_ID)))
        async with tls_server(credentials) as port:
            no_cert = await asyncio.to_thread(health_check, port, authority.roots_pem, None)
            foreign = await asyncio.to_thread(
                health_check, port, authority.roots_pem, stranger.leaf(CLIENT_ID)
            )
        assert no_cert == grpc.StatusCode.UNAVAILABLE
        assert foreign == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


# -- the Workload API watcher ------------------------------------------------------------


class ScriptedClient:
    """Stands in for py-spiffe's WorkloadApiClient: each connection follows one step."""

    def __init__(self, step: Callable[[Callable[[Any], None], Callable[[Exception], None]], None]):
        self._step = step
        self.closed = False

    def stream_x509_contexts(
        self,
        on_success: Callable[[Any], None],
        on_error: Callable[[Exception], None],
        retry_connect: bool = True,
    ) -> Any:
        assert retry_connect is False  # the watcher does its own retries, to see every error
        threading.Thread(target=self._step, args=(on_success, on_error), daemon=True).start()
        return self

    def cancel(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Script:
    """The connections of one test, in order; the last one repeats."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.connections = 0
        self.open_streams: list[tuple[Callable[[Any], None], Callable[[Exception], None]]] = []

    def factory(self, socket: str) -> ScriptedClient:
        step = self.steps[min(self.connections, len(self.steps) - 1)]
        self.connections += 1
        if isinstance(step, Exception):
            raise step
        return ScriptedClient(step)


def denied(on_success: Callable[[Any], None], on_error: Callable[[Exception], None]) -> None:
    on_error(Exception("gRPC error: StatusCode.PERMISSION_DENIED"))


def serving(script: Script, context: Any) -> Callable[..., None]:
    def step(on_success: Callable[[Any], None], on_error: Callable[[Exception], None]) -> None:
        script.open_streams.append((on_success, on_error))
        on_success(context)

    return step


async def eventually(condition: Callable[[], Any]) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while loop.time() < deadline:
        result = condition()
        if result:
            return result
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met before the deadline")


def test_watcher_waits_through_errors_then_follows_updates_and_reconnects(
    authority: Authority,
) -> None:
    first, second = authority.context(AUTHZ_ID), authority.context(AUTHZ_ID)
    script = Script(
        FileNotFoundError("socket /run/agent.sock does not exist"),  # agent not started yet
        denied,  # no entry for this process yet
    )

    async def scenario() -> None:
        credentials = SvidCredentials()
        watcher = WorkloadSvidWatcher(
            "/run/agent.sock", credentials, client_factory=script.factory, max_backoff=0.05
        )
        task = asyncio.create_task(watcher.run())
        try:
            await eventually(lambda: script.connections >= 3)
            assert credentials.current is None
            assert watcher.last_error is not None
            assert "PERMISSION_DENIED" in watcher.last_error

            script.steps.append(serving(script, first))
            identity = await asyncio.wait_for(watcher.first(), DEADLINE)
            assert identity.spiffe_id == AUTHZ_ID
            assert identity.serial == first.default_svid.leaf.serial_number
            assert watcher.last_error is None

            # A rotation pushed on the open stream replaces the identity.
            on_success, on_error = script.open_streams[-1]
            on_success(second)
            second_serial = second.default_svid.leaf.serial_number
            await eventually(lambda: credentials.current.serial == second_serial)

            # The stream breaks (agent restarted): the watcher reconnects by itself and
            # keeps the identity it has meanwhile.
            streams = len(script.open_streams)
            on_error(Exception("Workload API stream ended unexpectedly"))
            await eventually(lambda: len(script.open_streams) > streams)
            assert credentials.current is not None
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
