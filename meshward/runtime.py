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
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from cryptography import x509
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from identity.accelerators import detect_accelerators
from identity.admin import IdentityAdmin
from identity.admin_api import create_admin_app
from identity.agent import Agent
from identity.agent_endpoints import AgentEndpoints
from identity.agent_metrics import agent_registry
from identity.authority import CASettings, CertificateAuthority
from identity.handshake_offload import HandshakeOffload, OffloadMode, OffloadSettings
from identity.health_api import health_router
from identity.k8s_attestor import K8sAttestor
from identity.keys import load_private_key
from identity.local_backend import LocalBackend
from identity.metrics import IdentityMetrics
from identity.node_api import NodeAPI
from identity.node_client import AgentIdentity, NodeBackend, attest_join_token, attest_x509pop
from identity.peer_front import BACKLOG
from identity.server_tls import ServerTLS
from identity.spiffeid import parse_trust_domain
from identity.store.database import Database, sqlite_url
from identity.unix_attestor import UnixAttestor
from identity.upstream import load_upstream
from identity.workload_attestation import ProcessAttestor
from identity.workload_cache import WorkloadCache
from meshward.config import Config, ConfigError
from meshward.native_policies import (
    NO_POLICIES,
    NativePolicies,
    NativePoliciesCollector,
    agent_policies_ready,
    native_policies,
)

if TYPE_CHECKING:
    from meshward.up import AuthzChild

__all__ = [
    "IdentityServer",
    "Listeners",
    "bind_listeners",
    "build_identity_server",
    "handshake_offload",
    "prepare_data_dir",
    "run",
    "run_agent",
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
    audit: socket.socket | None = None  # `meshward up` only: the audit API and page
    agent_health: socket.socket | None = None  # `meshward up` only

    def close(self, config: Config) -> None:
        for sock in (self.admin, self.health, self.agent, self.audit, self.agent_health):
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
        agent_sock = audit_sock = agent_health = None
        if agent and config.audit.listen:
            audit_sock = _listen_tcp(config.audit.listen, setting="audit.listen")
            undo.callback(audit_sock.close)
        if agent and config.agent.health_listen:
            agent_health = _listen_tcp(config.agent.health_listen, setting="agent.health_listen")
            undo.callback(agent_health.close)
        if agent:
            agent_sock = _listen_unix(config.agent_socket, private=False, setting="agent.socket")
        undo.pop_all()
    return Listeners(
        admin=admin, health=health, agent=agent_sock, audit=audit_sock, agent_health=agent_health
    )


async def serve(
    server: IdentityServer,
    listeners: Listeners,
    *,
    policies: Path | None = None,
    agent_policies: Path | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; with ``policies`` (``up``) run authz on them as a child.

    ``agent_policies`` is the directory the local agent serves over ECDS as RBAC filters.
    """
    config = server.config
    admin_app = create_admin_app(server.admin, registry=server.registry, ready=server.ready)
    servers = [(_Server(_uvicorn_config(admin_app)), listeners.admin)]
    if listeners.health is not None:
        health_app = FastAPI(title="meshward health")
        health_app.include_router(health_router(server.registry, server.ready))
        servers.append((_Server(_uvicorn_config(health_app)), listeners.health))
    audit = None
    if listeners.audit is not None:
        from meshward.audit_runtime import AuditServer

        audit = AuditServer(config)
        servers.append((_Server(_uvicorn_config(audit.app)), listeners.audit))

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def stop() -> None:
        stopping.set()
        for s, _ in servers:
            s.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tls: ServerTLS | None = None
    node_servers: list[grpc.aio.Server] = []
    if config.server.node_listen:
        tls, node_servers = await _start_node_api(server)
    tasks = [asyncio.create_task(_rotate_forever(server, tls))]
    if audit is not None:
        tasks.append(asyncio.create_task(audit.keep_migrating()))
    endpoints = None
    if listeners.agent is not None:
        native = (
            native_policies(config, agent_policies, trust_domain=server.ca.trust_domain.name)
            if agent_policies is not None
            else None
        )
        endpoints, agent = _local_agent(server, native)
        cache = agent.cache
        await agent.sync()
        if native is not None:
            native.accept(await asyncio.to_thread(native.read))
            tasks.append(asyncio.create_task(native.run()))
        await endpoints.start(listeners.agent)
        tasks.append(asyncio.create_task(agent.run()))
        if listeners.agent_health is not None:
            agent_health = FastAPI(title="meshward agent health")
            offload = endpoints.sds.offload
            ecds = endpoints.ecds.stats

            def agent_ready() -> tuple[bool, dict[str, Any]]:
                ok, policy_details = agent_policies_ready(native, ecds)
                return ok, {
                    "agent": server.admin.default_parent_id,
                    "entries": len(cache.entries),
                    "handshake_offload": offload.as_json() if offload else None,
                    **policy_details,
                }

            agent_health.include_router(
                health_router(_agent_metrics(agent.cache, endpoints, native), agent_ready)
            )
            agent_server = _Server(_uvicorn_config(agent_health))
            servers.append((agent_server, listeners.agent_health))
    authz: list[AuthzChild] = []
    if policies is not None:
        from meshward.authz_workers import worker_configs
        from meshward.up import AuthzChild

        authz = [AuthzChild(worker, policies) for worker in worker_configs(config)]
        tasks.extend(asyncio.create_task(child.supervise(stopping)) for child in authz)
    from meshward.up import listing

    print(
        listing(
            config,
            policies=policies,
            agent=endpoints is not None,
            audit=audit is not None,
            agent_policies=agent_policies,
        ),
        flush=True,
    )
    try:
        serving = asyncio.gather(*(s.serve(sockets=[sock]) for s, sock in servers))
        # A signal, or authz misconfigured (then it is `up` that fails).
        first: list[asyncio.Future[Any]] = [asyncio.ensure_future(stopping.wait()), serving]
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await serving
    finally:
        for task in tasks:
            task.cancel()
        # authz first: it drains its spool into the store while the rest still stands.
        await asyncio.gather(*tasks, return_exceptions=True)
        if endpoints is not None:
            await endpoints.stop()
        for grpc_server in node_servers:
            await grpc_server.stop(1)
        server.ca.close()
        server.db.dispose()
        if audit is not None:
            audit.close()
    for child in authz:
        if child.error is not None:
            raise child.error


def _agent_metrics(
    cache: WorkloadCache, endpoints: AgentEndpoints, native: NativePolicies | None
) -> CollectorRegistry:
    registry = agent_registry(
        cache, endpoints.sds.stats, endpoints.sds.offload, endpoints.ecds.stats
    )
    if native is not None:
        registry.register(NativePoliciesCollector(native))
    return registry


def _local_agent(
    server: IdentityServer, native: NativePolicies | None
) -> tuple[AgentEndpoints, Agent]:
    """The agent of ``meshward up``: same process, signing with the CA directly."""
    config = server.config
    cache = WorkloadCache(server.ca.bundle)
    agent = Agent(
        backend=LocalBackend(
            admin=server.admin, agent_id=server.admin.default_parent_id, clock=server.clock
        ),
        cache=cache,
        clock=server.clock,
        key_type=config.agent.workload_key_type,
    )
    endpoints = AgentEndpoints(
        socket=config.agent_socket,
        private_dir=config.data_dir / "agent",
        attestors=_attestors(config),
        source=cache,
        sign_jwt=agent.sign_jwt_svid,
        disable_spiffe_cert_validation=config.agent.disable_spiffe_cert_validation,
        offload=handshake_offload(config),
        extension_configs=native,
        no_extension_configs=NO_POLICIES,
        max_connections_per_uid=config.agent.max_connections_per_uid,
    )
    return endpoints, agent


def handshake_offload(config: Config, root: Path = Path("/")) -> HandshakeOffload:
    """Detect this host's accelerators (under ``root``) and say in one line what was found."""
    agent = config.agent
    offload = HandshakeOffload(
        OffloadSettings(
            mode=OffloadMode(agent.private_key_provider),
            cryptomb_poll_delay=agent.cryptomb_poll_delay,
            qat_poll_delay=agent.qat_poll_delay,
            key_type=agent.workload_key_type,
        ),
        detect_accelerators(root),
    )
    log.info(
        "agent: handshake offload: private_key_provider %s, workload keys %s; %s; "
        "each Envoy's key provider extensions are checked when it connects",
        agent.private_key_provider,
        agent.workload_key_type,
        offload.host.summary(),
    )
    return offload


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


def run(
    config: Config,
    *,
    agent: bool = False,
    policies: Path | None = None,
    agent_policies: Path | None = None,
) -> None:
    """Bind, build and serve until SIGINT/SIGTERM; with ``agent`` also the local agent
    (serving ``agent_policies`` over ECDS), with ``policies`` also authz (a child process)."""
    prepare_data_dir(config.data_dir)
    listeners = bind_listeners(config, agent=agent)
    try:
        server = build_identity_server(config, local_agent=agent)
        asyncio.run(serve(server, listeners, policies=policies, agent_policies=agent_policies))
    finally:
        listeners.close(config)


async def _rotate_forever(server: IdentityServer, tls: ServerTLS | None) -> None:
    interval = min(max(server.ca.settings.ttl / 100, timedelta(seconds=1)), timedelta(seconds=10))
    while True:
        await asyncio.sleep(interval.total_seconds())
        try:
            await asyncio.to_thread(server.ca.rotate, server.clock())
            if tls is not None:
                await asyncio.to_thread(tls.refresh)
        except Exception:
            # Keep serving with the current CA; the next tick retries.
            log.exception("ca: rotation failed")


async def _start_node_api(server: IdentityServer) -> tuple[ServerTLS, list[grpc.aio.Server]]:
    """Attestation (TLS) and node API (mTLS) listeners for remote agents."""
    config = server.config.server
    tls = ServerTLS(server.ca, clock=server.clock, ttl=config.agent_svid_ttl)
    roots: list[x509.Certificate] = []
    if config.x509pop_ca_bundle is not None:
        try:
            roots = x509.load_pem_x509_certificates(config.x509pop_ca_bundle.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"server.x509pop_ca_bundle {config.x509pop_ca_bundle}: no PEM certificates ({exc})"
            ) from exc
    api = NodeAPI(
        admin=server.admin,
        clock=server.clock,
        agent_svid_ttl=config.agent_svid_ttl,
        x509pop_roots=roots,
    )
    servers = []
    for setting, address, handlers, mtls in (
        ("server.attestation_listen", config.attestation_listen, api.attestation_handlers(), False),
        ("server.node_listen", config.node_listen, api.agent_handlers(), True),
    ):
        grpc_server = grpc.aio.server()
        grpc_server.add_generic_rpc_handlers((handlers,))
        try:
            grpc_server.add_secure_port(address, tls.credentials(require_client_auth=mtls))
        except RuntimeError as exc:
            raise ConfigError(
                f"{setting} {address} cannot be used ({exc}); pick a free port"
            ) from exc
        await grpc_server.start()
        servers.append(grpc_server)
    return tls, servers


def run_agent(config: Config) -> None:
    """A stand-alone agent: attest (or resume), then serve workloads until SIGINT/SIGTERM."""
    prepare_data_dir(config.data_dir)
    health_sock = (
        _listen_tcp(config.agent.health_listen, setting="agent.health_listen")
        if config.agent.health_listen
        else None
    )
    try:
        sock = _listen_unix(config.agent_socket, private=False, setting="agent.socket")
    except ConfigError:
        if health_sock is not None:
            health_sock.close()
        raise
    try:
        asyncio.run(_serve_agent(config, sock, health_sock))
    finally:
        sock.close()
        if health_sock is not None:
            health_sock.close()
        config.agent_socket.unlink(missing_ok=True)


async def _serve_agent(
    config: Config, sock: socket.socket, health_sock: socket.socket | None
) -> None:
    private = config.data_dir / "agent"
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(private, 0o700)
    identity = AgentIdentity.load(private)
    if identity is None:
        identity = await _attest(config, private)
        log.info("agent: attested as %s", identity.agent_id)
    else:
        log.info("agent: resuming as %s", identity.agent_id)
    backend = NodeBackend(address=config.agent.server_address, identity=identity, clock=utcnow)
    sync = asyncio.create_task(backend.run())
    while True:
        try:
            bundle = await backend.bundle()
            break
        except TimeoutError:
            log.warning("agent: still waiting for the server at %s", config.agent.server_address)
    cache = WorkloadCache(bundle)
    agent = Agent(
        backend=backend, cache=cache, clock=utcnow, key_type=config.agent.workload_key_type
    )
    offload = handshake_offload(config)
    native = None
    if config.agent.policies is not None:
        # Principals are matched against the trust domain the server gave the agent.
        trust_domain = config.trust_domain or bundle.trust_domain.name
        native = native_policies(config, config.agent.policies, trust_domain=trust_domain)
        native.accept(await asyncio.to_thread(native.read))
    endpoints = AgentEndpoints(
        socket=config.agent_socket,
        private_dir=private,
        attestors=_attestors(config),
        source=cache,
        sign_jwt=agent.sign_jwt_svid,
        disable_spiffe_cert_validation=config.agent.disable_spiffe_cert_validation,
        offload=offload,
        extension_configs=native,
        no_extension_configs=NO_POLICIES,
        max_connections_per_uid=config.agent.max_connections_per_uid,
    )
    await agent.sync()
    await endpoints.start(sock)
    health = None
    if health_sock is not None:
        app = FastAPI(title="meshward agent health")

        def ready() -> tuple[bool, dict[str, Any]]:
            ok, policy_details = agent_policies_ready(native, endpoints.ecds.stats)
            return ok, {
                "agent": identity.agent_id,
                "entries": len(cache.entries),
                "handshake_offload": offload.as_json(),
                **policy_details,
            }

        app.include_router(health_router(_agent_metrics(cache, endpoints, native), ready))
        health = _Server(_uvicorn_config(app))
    log.info("meshward agent %s: workloads on unix://%s", identity.agent_id, config.agent_socket)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    tasks = [asyncio.create_task(agent.run()), sync]
    if native is not None:
        tasks.append(asyncio.create_task(native.run()))
    if health is not None and health_sock is not None:
        tasks.append(asyncio.create_task(health.serve(sockets=[health_sock])))
    try:
        await stopped.wait()
    finally:
        if health is not None:
            health.should_exit = True
        for task in tasks:
            task.cancel()
        await endpoints.stop()
        await backend.close()


async def _attest(config: Config, private: Path) -> AgentIdentity:
    agent = config.agent
    if agent.trust_bundle_path is None:
        raise ConfigError(
            "agent.trust_bundle_path (--trust-bundle) is needed for the first attestation, to "
            "verify the server: write it with `meshward bundle show --format pem` on the server"
        )
    try:
        bootstrap = agent.trust_bundle_path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read agent.trust_bundle_path: {exc}") from exc
    try:
        if agent.join_token:
            return await attest_join_token(
                address=agent.attestation_address,
                bootstrap_bundle=bootstrap,
                token=agent.join_token,
                directory=private,
            )
        if agent.x509pop is not None:
            try:
                chain = agent.x509pop.cert_file.read_bytes()
                key = load_private_key(agent.x509pop.key_file.read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(
                    f"agent.x509pop: cannot load the certificate or key ({exc})"
                ) from exc
            return await attest_x509pop(
                address=agent.attestation_address,
                bootstrap_bundle=bootstrap,
                chain_pem=chain,
                key=key,
                directory=private,
            )
    except grpc.aio.AioRpcError as exc:
        raise ConfigError(
            f"attestation to {agent.attestation_address} failed: {exc.details()} ({exc.code().name})"
        ) from exc
    raise ConfigError(
        "no way to attest: pass --join-token (from `meshward token generate`) or configure "
        "agent.x509pop"
    )


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


def _listen_tcp(address: str, *, setting: str = "server.health_listen") -> socket.socket:
    host, _, port = address.rpartition(":")
    try:
        return socket.create_server((host.strip("[]"), int(port)), backlog=128)
    except OSError as exc:
        raise ConfigError(
            f"{setting} {address} cannot be used ({exc.strerror or exc}); pick a "
            'free port, or set it to "" to turn the health listener off'
        ) from exc


def _uvicorn_config(app: FastAPI) -> uvicorn.Config:
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
