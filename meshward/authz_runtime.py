"""Process wiring for ``meshward authz``: policy store, Check servicer, health, reload loop."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter

from authz.audit_sink import AuditSink, JsonLinesSink
from authz.policy_store import PolicyStore
from authz.server import AuthorizationServicer
from meshward.config import Config, ConfigError

__all__ = ["build_authz", "run_authz"]

log = logging.getLogger("meshward")
_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name


def build_authz(
    config: Config, *, policies: Path, sink: AuditSink, registry: CollectorRegistry
) -> tuple[PolicyStore, AuthorizationServicer]:
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
    store = PolicyStore(
        policies,
        trust_domain=config.trust_domain,
        trust_domain_aliases=tuple(config.authz.trust_domain_aliases),
        root_namespace=config.authz.root_namespace,
        on_reload=lambda ok: reloads.labels("ok" if ok else "error").inc(),
    )
    servicer = AuthorizationServicer(
        store=store, sink=sink, registry=registry, explain_denials=config.authz.explain_denials
    )
    return store, servicer


def run_authz(config: Config, *, policies: Path, listen: str) -> None:
    if not policies.is_dir():
        raise ConfigError(f"--policies {policies} is not a directory (it holds istio/ and rego/)")
    asyncio.run(_serve(config, policies=policies, listen=listen))


async def _serve(config: Config, *, policies: Path, listen: str) -> None:
    registry = CollectorRegistry()
    sink = JsonLinesSink(config.data_dir / "audit" / "decisions.jsonl")
    store, servicer = build_authz(config, policies=policies, sink=sink, registry=registry)
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            _SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    try:
        server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise ConfigError(f"--listen {listen} cannot be used ({exc})") from exc
    # SERVING only once a policy set is loaded: Envoy must not send traffic before.
    for name in ("", _SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("meshward authz: Check on %s, policies from %s", listen, policies)

    async def reload_forever() -> None:
        serving = False
        while True:
            if store.changed():
                await asyncio.to_thread(store.reload)
            if store.current is not None and not serving:
                for name in ("", _SERVICE):
                    await health.set(name, health_pb2.HealthCheckResponse.SERVING)
                serving = True
            await asyncio.sleep(config.authz.reload_interval.total_seconds())

    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopped.set)
    reloader = asyncio.create_task(reload_forever())
    try:
        await stopped.wait()
    finally:
        reloader.cancel()
        await server.stop(1)
        sink.close()
