"""Process wiring: build the identity server from a Config and serve it until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from identity.admin import IdentityAdmin
from identity.admin_api import create_admin_app
from identity.agent import Agent
from identity.agent_endpoints import AgentEndpoints
from identity.authority import CASettings, CertificateAuthority
from identity.health_api import health_router
from identity.k8s_attestor import K8sAttestor
from identity.local_backend import LocalBackend
from identity.metrics import IdentityMetrics
from identity.peer_front import BACKLOG
from identity.spiffeid import parse_trust_domain
from identity.store.database import Database, sqlite_url
from identity.unix_attestor import UnixAttestor
from identity.upstream import load_upstream
from identity.workload_attestation import ProcessAttestor
from identity.workload_cache import WorkloadCache
from meshward.config import Config, ConfigError

__all__ = [
    "IdentityServer",
    "Listeners",
    "bind_listeners",
    "build_identity_server",
    "prepare_data_dir",
    "run",
    "serve",
]

log = logging.getLogger("meshward")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class IdentityServer:
    config: Config
    db: Database
    ca: CertificateAuthority
    admin: IdentityAdmin
    registry: CollectorRegistry
    clock: Callable[[], datetime] = utcnow

    def ready(self) -> tuple[bool, dict[str, Any]]:
        active = self.ca.active
        if active is None or active.issuer is None or active.not_after <= self.clock():
            return False, {"ca": "no active CA"}
        try:
            self.db.check()
        except Exception as exc:  # readiness reports, it never raises
            return False, {"database": str(exc)}
        return True, {"ca": active.id, "ca_not_after": active.not_after.isoformat()}


def prepare_data_dir(path: Path) -> None:
    """Create the data dir and prove it is writable, or say what to fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"data dir {path} is not usable ({exc.strerror or exc}); choose another "
            "--data-dir (or MESHWARD_DATA_DIR) or fix its permissions"
        ) from exc


def build_identity_server(
    config: Config, *, clock: Callable[[], datetime] = utcnow, local_agent: bool = False
) -> IdentityServer:
    """The server; with ``local_agent`` entries default to the in-process agent as parent."""
    if config.trust_domain is None:
        raise ConfigError(
            "trust_domain is not set; pass --trust-domain, set MESHWARD_TRUST_DOMAIN or put "
            "trust_domain: in the config file"
        )
    trust_domain = parse_trust_domain(config.trust_domain)
    prepare_data_dir(config.data_dir)
    db = Database(config.database_url or sqlite_url(config.data_dir.resolve()))
    db.migrate()
    upstream = None
    if config.ca.upstream is not None:
        up = config.ca.upstream
        upstream = load_upstream(up.cert_file, up.key_file, up.bundle_file, now=clock())
    registry = CollectorRegistry()
    metrics = IdentityMetrics(registry)
    ca = CertificateAuthority(
        db=db,
        trust_domain=trust_domain,
        key_dir=config.data_dir / "keys",
        settings=CASettings(
            key_type=config.ca.key_type,
            jwt_key_type=config.ca.jwt_key_type,
            ttl=config.ca.ttl,
            x509_svid_ttl=config.svid.x509_ttl,
            jwt_svid_ttl=config.svid.jwt_ttl,
            bundle_grace=config.ca.bundle_grace,
        ),
        metrics=metrics,
        upstream=upstream,
    )
    ca.load(clock())
    admin = IdentityAdmin(
        db=db,
        ca=ca,
        default_parent_id=f"{trust_domain.as_spiffe_id()}/meshward/"
        + ("agent/local" if local_agent else "server"),
        clock=clock,
    )
    metrics.watch(
        ca_not_after=lambda: ca.active.not_after if ca.active else None,
        entries=admin.count_entries,
    )
    return IdentityServer(config=config, db=db, ca=ca, admin=admin, registry=registry, clock=clock)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: one handler in ``serve`` stops every server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(slots=True)
class Listeners:
    admin: socket.socket
    health: socket.socket | None
    agent: socket.socket | None

    def close(self, config: Config) -> None:
        for sock in (self.admin, self.health, self.agent):
            if sock is not None:
                sock.close()
        config.admin_socket.unlink(missing_ok=True)
        if self.agent is not None:
            config.agent_socket.unlink(missing_ok=True)


def bind_listeners(config: Config, *, agent: bool) -> Listeners:
    """Bind every socket before anything else starts, so a busy port or a bad path fails fast.

    Binding here rather than in uvicorn or grpc also makes those a ConfigError naming the
    setting, not a traceback from inside the event loop.
    """
    with contextlib.ExitStack() as undo:
        admin = _listen_unix(config.admin_socket, private=True, setting="server.admin_socket")
        undo.callback(admin.close)
        undo.callback(config.admin_socket.unlink, missing_ok=True)
        health = None
        if config.server.health_listen:
            health = _listen_tcp(config.server.health_listen)
            undo.callback(health.close)
        agent_sock = None
        if agent:
            agent_sock = _listen_unix(config.agent_socket, private=False, setting="agent.socket")
        undo.pop_all()
    return Listeners(admin=admin, health=health, agent=agent_sock)


async def serve(server: IdentityServer, listeners: Listeners) -> None:
    config = server.config
    admin_app = create_admin_app(server.admin, registry=server.registry, ready=server.ready)
    servers = [(_Server(_uvicorn_config(admin_app)), listeners.admin)]
    if listeners.health is not None:
        health_app = FastAPI(title="meshward health")
        health_app.include_router(health_router(server.registry, server.ready))
        servers.append((_Server(_uvicorn_config(health_app)), listeners.health))

    loop = asyncio.get_running_loop()

    def stop() -> None:
        for s, _ in servers:
            s.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(_rotate_forever(server))]
    endpoints = None
    if listeners.agent is not None:
        endpoints, agent = _local_agent(server)
        await agent.sync()
        await endpoints.start(listeners.agent)
        tasks.append(asyncio.create_task(agent.run()))
    log.info(
        "meshward %s: trust domain %s, admin API on %s, health on %s%s",
        "up" if endpoints else "server",
        server.ca.trust_domain.name,
        config.admin_socket,
        config.server.health_listen or "(off)",
        f", agent on unix://{config.agent_socket}" if endpoints else "",
    )
    try:
        await asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in servers))
    finally:
        for task in tasks:
            task.cancel()
        if endpoints is not None:
            await endpoints.stop()
        server.ca.close()
        server.db.dispose()


def _local_agent(server: IdentityServer) -> tuple[AgentEndpoints, Agent]:
    """The agent of ``meshward up``: same process, signing with the CA directly."""
    config = server.config
    cache = WorkloadCache(server.ca.bundle)
    agent = Agent(
        backend=LocalBackend(
            admin=server.admin, agent_id=server.admin.default_parent_id, clock=server.clock
        ),
        cache=cache,
        clock=server.clock,
    )
    endpoints = AgentEndpoints(
        socket=config.agent_socket,
        private_dir=config.data_dir / "agent",
        attestors=_attestors(config),
        source=cache,
        sign_jwt=agent.sign_jwt_svid,
        disable_spiffe_cert_validation=config.agent.disable_spiffe_cert_validation,
    )
    return endpoints, agent


def _attestors(config: Config) -> list[ProcessAttestor]:
    attestors: list[ProcessAttestor] = [
        UnixAttestor(
            discover_workload_path=config.agent.discover_workload_path,
            workload_size_limit=config.agent.workload_size_limit,
        )
    ]
    k8s = config.agent.k8s
    if k8s is not None:
        attestors.append(
            K8sAttestor(
                **k8s.model_dump(exclude={"poll_retry_interval"}),
                poll_retry_interval=k8s.poll_retry_interval.total_seconds(),
            )
        )
    return attestors


def run(config: Config, *, agent: bool = False) -> None:
    """Bind, build and serve until SIGINT/SIGTERM; with ``agent`` also the local agent."""
    prepare_data_dir(config.data_dir)
    listeners = bind_listeners(config, agent=agent)
    try:
        server = build_identity_server(config, local_agent=agent)
        asyncio.run(serve(server, listeners))
    finally:
        listeners.close(config)


async def _rotate_forever(server: IdentityServer) -> None:
    interval = min(max(server.ca.settings.ttl / 100, timedelta(seconds=1)), timedelta(seconds=10))
    while True:
        await asyncio.sleep(interval.total_seconds())
        try:
            await asyncio.to_thread(server.ca.rotate, utcnow())
        except Exception:
            # Keep serving with the current CA; the next tick retries.
            log.exception("ca: rotation failed")


def _listen_unix(path: Path, *, private: bool, setting: str) -> socket.socket:
    """Listen on a Unix socket; a private one sits in a 0700 directory. Refuse a live socket."""
    if private:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise ConfigError(
                f"another meshward server is already listening on {path}; stop it or use "
                "another --data-dir"
            )
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {path} ({exc.strerror or exc}); a socket path is at most "
            f"107 bytes, so use a shorter --data-dir or set {setting}"
        ) from exc
    if private:
        os.chmod(path, 0o600)
    sock.listen(BACKLOG)
    return sock


def _listen_tcp(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    try:
        return socket.create_server((host.strip("[]"), int(port)), backlog=128)
    except OSError as exc:
        raise ConfigError(
            f"server.health_listen {address} cannot be used ({exc.strerror or exc}); pick a "
            'free port, or set it to "" to turn the health listener off'
        ) from exc


def _uvicorn_config(app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
