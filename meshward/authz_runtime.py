"""Process wiring for ``meshward authz``: policy store, Check servicer, health, reload loop.

gRPC (Check, Envoy's access-log and metrics services, the standard health service,
reflection) listens on ``authz.listen``: TCP or a Unix socket, plaintext or, with
``authz.tls``, mTLS with the process's own X509-SVID from the agent. ``/live``,
``/ready`` and ``/metrics`` are served on ``authz.health_listen`` the way the server
and the agent serve them. Decisions go to the audit spool, drained by a shipper child
(``meshward.authz_audit``); so do those Envoy enforced itself, from its access log
(``meshward.authz_telemetry``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from fastapi import FastAPI
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge

from audit.redaction import Redaction
from audit.sink import AuditSink
from authz.client_identity import AllowedClients
from authz.policy_store import PolicyStore, ServedPolicies
from authz.rbac_versions import ChainVersions
from authz.rego_engine import watch_evaluations
from authz.rego_provider import RegoSettings
from authz.server import AuthorizationServicer
from authz.workload_svid import SvidCredentials, WorkloadSvidWatcher
from identity.health_api import health_router
from meshward.authz_audit import AuthzAudit
from meshward.authz_telemetry import ACCESS_LOG_SERVICE, AuthzTelemetry
from meshward.config import AuthzTLSConfig, Config, ConfigError
from meshward.durations import format_duration
from meshward.lifeline import watch as lifeline_watch
from meshward.rego_watchdog import RegoWatchdog
from meshward.runtime import _listen_tcp, _Server, _uvicorn_config

__all__ = ["AuthzStatus", "GrpcAddress", "build_authz", "grpc_address", "run_authz"]

log = logging.getLogger("meshward")
_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def policy_store(
    config: Config, policies: Path, *, on_reload: Callable[[bool], None] | None = None
) -> PolicyStore:
    """The store ``meshward authz`` serves from; lint loads through the same one."""
    assert config.trust_domain is not None  # callers check, each with its own message
    rego = config.authz.rego
    return PolicyStore(
        policies,
        trust_domain=config.trust_domain,
        trust_domain_aliases=tuple(config.authz.trust_domain_aliases),
        root_namespace=config.authz.root_namespace,
        rego_decision=rego.decision,
        rego_dry_run_packages=tuple(rego.dry_run_packages),
        on_reload=on_reload,
        max_file_bytes=config.authz.max_policy_file_bytes,
    )


def build_authz(
    config: Config,
    *,
    policies: Path,
    sink: AuditSink,
    registry: CollectorRegistry,
    redaction: Redaction | None = None,
    audit_required: bool = False,
    on_served: Callable[[ServedPolicies], None] | None = None,
) -> tuple[PolicyStore, AuthorizationServicer]:
    """The store and servicer; ``redaction`` set: records carry the request snapshot."""
    if config.trust_domain is None:
        raise ConfigError(
            "trust_domain is not set; pass --trust-domain, set MESHWARD_TRUST_DOMAIN or put "
            "trust_domain: in the config file (policy principals are matched against it)"
        )
    reloads = Counter(
        "meshward_policy_reloads",
        "Policy directory loads, by outcome (ok: now served; error: last good set kept)",
        ["outcome"],
        registry=registry,
    )
    rego = config.authz.rego

    def reloaded(ok: bool) -> None:
        reloads.labels("ok" if ok else "error").inc()
        if ok and on_served is not None and store.current is not None:
            on_served(store.current)

    store = policy_store(config, policies, on_reload=reloaded)
    Gauge(
        "meshward_policy_problems",
        "Problems found in the policy directory by the last load (0: it is served)",
        registry=registry,
    ).set_function(lambda: len(store.issues))
    servicer = AuthorizationServicer(
        store=store,
        sink=sink,
        registry=registry,
        explain_denials=config.authz.explain_denials,
        rego=RegoSettings(
            mode=rego.mode,
            dry_run=rego.dry_run,
            parse_body=rego.parse_body,
            max_body_bytes=rego.max_body_bytes,
            timeout=rego.timeout.total_seconds(),
        ),
        redaction=redaction,
        audit_required=audit_required,
    )
    return store, servicer


@dataclass(slots=True, frozen=True)
class GrpcAddress:
    target: str  # what grpc binds: host:port or unix:PATH
    socket_path: Path | None  # the Unix socket, removed again at exit


def grpc_address(listen: str) -> GrpcAddress:
    """``authz.listen`` as gRPC's bind target; a Unix socket's place is checked first.

    gRPC would unlink a live socket of another process and take its place, and report a
    missing directory only as "failed to bind": both are refused here with what to fix.
    """
    if listen.startswith("unix:"):
        raw = listen.removeprefix("unix://") if listen.startswith("unix:///") else listen[5:]
    elif listen.startswith("/"):
        raw = listen
    else:
        _probe_tcp(listen)
        return GrpcAddress(target=listen, socket_path=None)
    setting = f"authz.listen (--listen) {listen}"
    where = Path(raw).absolute()
    if len(os.fsencode(where)) > _UNIX_PATH_MAX:
        raise ConfigError(
            f"{setting}: a Unix socket path is at most {_UNIX_PATH_MAX} bytes and {where} "
            f"is {len(os.fsencode(where))}; choose a shorter path"
        )
    if not where.parent.is_dir():
        raise ConfigError(
            f"{setting}: directory {where.parent} does not exist; create it (meshward authz "
            "does not create the socket's directory)"
        )
    if where.exists() or where.is_symlink():
        if not stat.S_ISSOCK(where.lstat().st_mode):
            raise ConfigError(f"{setting}: {where} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(where))
        except OSError:
            where.unlink()  # a socket left by a process that is gone
        else:
            raise ConfigError(
                f"{setting}: another process is listening on {where}; stop it or choose "
                "another path"
            )
        finally:
            probe.close()
    return GrpcAddress(target=f"unix:{raw}", socket_path=where)


def _probe_tcp(listen: str) -> None:
    # gRPC reports a busy port as "failed to bind" after logging its own line on stderr;
    # binding once here first gives the one clear error instead.
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host, int(port)), family=family).close()
    except OSError as exc:
        raise ConfigError(
            f"authz.listen (--listen) {listen} cannot be used ({exc.strerror or exc}); pick a "
            "free port"
        ) from exc


class AuthzStatus:
    """What ``/ready`` reports: the served policy set, the last reload, the SVID.

    With ``authz.rego.mode: always`` and no Rego modules served every Check is denied
    (``rego_not_loaded``), so the process is not ready and ``rego`` says why.
    """

    def __init__(
        self,
        store: PolicyStore,
        *,
        credentials: SvidCredentials | None = None,
        watcher: WorkloadSvidWatcher | None = None,
        rego_mode: str = "custom",
        audit: AuthzAudit | None = None,
        telemetry: AuthzTelemetry | None = None,
    ) -> None:
        self._store = store
        self._credentials = credentials
        self._watcher = watcher
        self._rego_mode = rego_mode
        self._audit = audit
        self._telemetry = telemetry
        self.grpc_listening: str | None = None  # the address, once gRPC serves

    def ready(self) -> tuple[bool, dict[str, Any]]:
        served = self._store.current
        details: dict[str, Any] = {
            "grpc": self.grpc_listening or "not listening yet",
            "policy_set": self._policy_set(),
            "last_reload": self._last_reload(),
        }
        ok = served is not None and self.grpc_listening is not None
        if served is not None and served.rego is None and self._rego_mode == "always":
            details["rego"] = (
                f"authz.rego.mode is always but {self._store.rego_dir} holds no Rego modules: "
                "every Check is denied (rego_not_loaded)"
            )
            ok = False
        if self._credentials is not None:
            tls, tls_ok = self._tls()
            details["tls"] = tls
            ok = ok and tls_ok
        if self._audit is not None:
            audit_ok, details["audit"] = self._audit.details()
            ok = ok and audit_ok
        if self._telemetry is not None:
            details["access_log"] = self._telemetry.details()
        return ok, details

    def _policy_set(self) -> dict[str, Any] | None:
        served = self._store.current
        if served is None:
            return None
        rego = served.rego
        return {
            "version": served.version,
            "policies": len(served.istio.policies),
            "rego": (
                {
                    "decision": rego.decision,
                    "modules": rego.modules,
                    "dry_run_packages": sorted(rego.dry_run_packages),
                }
                if rego
                else None
            ),
        }

    def _last_reload(self) -> dict[str, Any]:
        served = self._store.current
        issues = self._store.issues
        if not issues:
            return {"outcome": "ok" if served else "pending"}
        message = (
            f"the newest policy files were rejected; policy set {served.version} (the last "
            "good one) keeps serving"
            if served
            else "the policy files were rejected and no earlier set was loaded: every "
            "Check is denied (no_policy_set)"
        )
        return {
            "outcome": "rejected",
            "message": message,
            "problems": [
                {
                    "file": i.file,
                    "document": i.document,
                    "field": i.field,
                    "line": i.line,
                    "message": i.message,
                }
                for i in issues
            ],
        }

    def _tls(self) -> tuple[dict[str, Any], bool]:
        assert self._credentials is not None
        identity = self._credentials.current
        error = self._watcher.last_error if self._watcher else None
        if identity is None:
            return {"svid": None, "waiting": error or "for the first X509-SVID"}, False
        expired = identity.not_after <= datetime.now(UTC)
        tls: dict[str, Any] = {
            "spiffe_id": identity.spiffe_id,
            "serial": f"{identity.serial:x}",
            "expires_at": identity.not_after.isoformat(),
        }
        if expired:
            tls["expired"] = True
        if error:
            tls["workload_api"] = error
        return tls, not expired


def run_authz(config: Config, *, policies: Path, lifeline: BinaryIO | None = None) -> None:
    """Bind, load, serve until SIGINT/SIGTERM (or ``lifeline``'s end of file, when it is
    ``meshward up``'s child). Every misconfiguration is a ConfigError."""
    if not config.authz.listen:
        raise ConfigError('authz.listen is "" (off); give it an address, e.g. 127.0.0.1:9191')
    if not policies.is_dir():
        raise ConfigError(f"--policies {policies} is not a directory (it holds istio/ and rego/)")
    address = grpc_address(config.authz.listen)
    health_sock = (
        _listen_tcp(config.authz.health_listen, setting="authz.health_listen")
        if config.authz.health_listen
        else None
    )
    try:
        asyncio.run(
            _serve(
                config,
                policies=policies,
                address=address,
                health_sock=health_sock,
                lifeline=lifeline,
            )
        )
    finally:
        if health_sock is not None:
            health_sock.close()
        if address.socket_path is not None:
            address.socket_path.unlink(missing_ok=True)


async def _serve(
    config: Config,
    *,
    policies: Path,
    address: GrpcAddress,
    health_sock: socket.socket | None,
    lifeline: BinaryIO | None,
) -> None:
    registry = CollectorRegistry()
    audit = AuthzAudit(config)
    registry.register(audit.collector())
    store, servicer = build_authz(
        config,
        policies=policies,
        sink=audit.writer,
        registry=registry,
        redaction=audit.redaction,
        audit_required=audit.required,
        on_served=audit.policy_set_served,
    )
    telemetry = AuthzTelemetry(
        config,
        sink=audit.writer,
        redaction=audit.redaction,
        registry=registry,
        versions=ChainVersions(lambda: store.current),
    )
    tls = config.authz.tls
    credentials: SvidCredentials | None = None
    watcher: WorkloadSvidWatcher | None = None
    if tls is not None:
        credentials = SvidCredentials()
        watcher = WorkloadSvidWatcher(tls.workload_api_socket, credentials)
    status = AuthzStatus(
        store,
        credentials=credentials,
        watcher=watcher,
        rego_mode=config.authz.rego.mode,
        audit=audit,
        telemetry=telemetry,
    )
    if credentials is not None:
        Gauge(
            "meshward_authz_svid_expiry_timestamp_seconds",
            "NotAfter of the X509-SVID the authz gRPC listener presents (0: none yet)",
            registry=registry,
        ).set_function(
            lambda: credentials.current.not_after.timestamp() if credentials.current else 0
        )
    # Ten times the timeout: a late result is already denied; this frees the process.
    watchdog = RegoWatchdog(10 * config.authz.rego.timeout.total_seconds())
    watch_evaluations(watchdog)
    health = health_aio.HealthServicer()
    # SERVING only once a policy set is loaded: Envoy must not send traffic before.
    await _set_health(health, health_pb2.HealthCheckResponse.NOT_SERVING)

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    if lifeline is not None:
        lifeline_watch(lifeline, lambda: loop.call_soon_threadsafe(stopped.set))
    shipper = asyncio.create_task(audit.supervise_shipper())
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(telemetry.keep_ledger())]
    http = http_task = None
    if health_sock is not None:
        app = FastAPI(title="meshward authz health")
        app.include_router(health_router(registry, status.ready))
        http = _Server(_uvicorn_config(app))
        http_task = asyncio.create_task(http.serve(sockets=[health_sock]))
    server: grpc.aio.Server | None = None
    try:
        if watcher is not None and tls is not None:
            # Load policies meanwhile, so /ready shows their problems during the wait.
            tasks.append(asyncio.create_task(_reload_forever(config, store, health)))
            tasks.append(asyncio.create_task(watcher.run()))
            if not await _first_svid(watcher, tls, stopped):
                return
        server = _grpc_server(config, servicer, health, registry, telemetry)
        port = _bind(server, address, credentials)
        await server.start()
        if watcher is None:
            # After the listener: "serving policy set" in the log means Check answers.
            tasks.append(asyncio.create_task(_reload_forever(config, store, health)))
        status.grpc_listening = (
            address.target
            if address.socket_path
            else f"{address.target.rpartition(':')[0]}:{port}"  # the port 0 picked
        )
        log.info(
            "meshward authz: Check on %s%s, policies from %s, health on %s",
            status.grpc_listening,
            " (mTLS)" if credentials else "",
            policies,
            config.authz.health_listen or "(off)",
        )
        await stopped.wait()
    finally:
        for task in tasks:
            task.cancel()
        if server is not None:
            await server.stop(1)
        if http is not None and http_task is not None:
            http.should_exit = True
            await http_task
        await asyncio.gather(*tasks, return_exceptions=True)
        # Nothing decides any more: close the spool, then let the shipper drain it.
        audit.close()
        telemetry.ledger.save()  # receipts of streams that ended after its last save
        shipper.cancel()
        await asyncio.gather(shipper, return_exceptions=True)
        watch_evaluations(None)
        watchdog.close()


async def _first_svid(
    watcher: WorkloadSvidWatcher, tls: AuthzTLSConfig, stopped: asyncio.Event
) -> bool:
    """Wait for the SVID; False if stopped meanwhile. Never falls back to plaintext."""
    first = asyncio.ensure_future(watcher.first())
    stop = asyncio.ensure_future(stopped.wait())
    try:
        done, _ = await asyncio.wait(
            {first, stop},
            timeout=tls.svid_timeout.total_seconds(),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        first.cancel()
        stop.cancel()
    if first in done:
        return True
    if stop in done:
        return False
    raise ConfigError(
        f"authz.tls: no X509-SVID from the Workload API at {tls.workload_api_socket} within "
        f"{format_duration(tls.svid_timeout)} ({watcher.last_error or 'no answer'}); is the "
        f"agent running, and is an entry registered for this process (e.g. selector "
        f"unix:uid:{os.getuid()})? Nothing was served."
    )


def _grpc_server(
    config: Config,
    servicer: AuthorizationServicer,
    health: health_aio.HealthServicer,
    registry: CollectorRegistry,
    telemetry: AuthzTelemetry,
) -> grpc.aio.Server:
    tls = config.authz.tls
    interceptors = (
        [AllowedClients(tls.allowed_clients, registry=registry)]
        if tls and tls.allowed_clients
        else []
    )
    # No SO_REUSEPORT: a second authz on the same port must fail, not share the traffic.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    telemetry.add_to(server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            _SERVICE,
            ACCESS_LOG_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server


def _bind(
    server: grpc.aio.Server, address: GrpcAddress, credentials: SvidCredentials | None
) -> int:
    try:
        if credentials is not None:
            return server.add_secure_port(address.target, credentials.server_credentials())
        return server.add_insecure_port(address.target)
    except RuntimeError as exc:
        raise ConfigError(
            f"authz.listen {address.target} cannot be used ({exc}); pick a free port "
            "(--listen) or another socket path"
        ) from exc


async def _set_health(health: health_aio.HealthServicer, status: Any) -> None:
    for name in ("", _SERVICE):
        await health.set(name, status)


async def _reload_forever(
    config: Config, store: PolicyStore, health: health_aio.HealthServicer
) -> None:
    serving = False
    while True:
        # Listing and stat-ing the directory is file I/O: kept off the loop serving Check.
        if await asyncio.to_thread(store.changed):
            await asyncio.to_thread(store.reload)
        if store.current is not None and not serving:
            await _set_health(health, health_pb2.HealthCheckResponse.SERVING)
            serving = True
        await asyncio.sleep(config.authz.reload_interval.total_seconds())
