"""The ECDS servicer on a real grpc.aio server over a Unix socket, fed by a source tests drive.

The servicer is the real one (:mod:`identity.ecds`); what it serves comes from
:class:`Source`, whose generations the test publishes one by one: per workload
namespace, a mapping of resource names to configs, or an error message. The caller
attestor and the entitlement check are fakes a test can turn against the caller.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.config.core.v3 import extension_pb2

from identity.ecds import ExtensionConfigDiscoveryServicer, add_ecds_servicer
from identity.errors import AttestationError, ExtensionConfigError
from identity.extension_configs import EnvoyWorkload
from identity.selectors import Selector

__all__ = ["DEADLINE", "EcdsServer", "Generation", "Source"]

DEADLINE = 20.0  # only keeps a broken run from hanging
T = TypeVar("T")
Configs = Mapping[str, extension_pb2.TypedExtensionConfig]


@dataclass(frozen=True)
class Generation:
    """What every workload gets, by namespace: its configs, or why it gets none."""

    version: int
    configs: Mapping[str, Configs] = field(default_factory=dict)
    errors: Mapping[str, str] = field(default_factory=dict)

    def for_workload(self, workload: EnvoyWorkload) -> Configs:
        if workload.namespace in self.errors:
            raise ExtensionConfigError(self.errors[workload.namespace])
        return self.configs.get(workload.namespace, {})


class Source:
    """An ExtensionConfigSource; ``publish`` runs on the server's loop."""

    def __init__(self) -> None:
        self.latest = Generation(0)
        self._event = asyncio.Event()

    async def changed(self, since: int) -> Generation:
        while self.latest.version <= since:
            self._event.clear()
            await self._event.wait()
        return self.latest

    def publish(
        self, configs: Mapping[str, Configs], errors: Mapping[str, str] | None = None
    ) -> Generation:
        self.latest = Generation(self.latest.version + 1, dict(configs), dict(errors or {}))
        self._event.set()
        return self.latest


class Attestor:
    def __init__(self) -> None:
        self.refuse = False

    async def attest(self, grpc_peer: str) -> frozenset[Selector]:
        if self.refuse:
            raise AttestationError("the test refuses this caller")
        return frozenset({Selector("test", "caller", "envoy")})


class _Subscription:
    def __init__(self, entitled: bool) -> None:
        self.latest = type("Update", (), {"svids": ("an svid",) if entitled else ()})()

    def close(self) -> None:
        pass


class Entitlement:
    def __init__(self) -> None:
        self.entitled = True

    def subscribe(self, selectors: frozenset[Selector]) -> Any:
        return _Subscription(self.entitled)


class EcdsServer:
    """The servicer on an event loop in a thread, listening on ``socket``."""

    def __init__(self, socket: Path, *, configured: bool = True) -> None:
        self.socket = socket
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.source: Source = self.run(Source)
        self.attestor = Attestor()
        self.entitlement = Entitlement()
        self.servicer = ExtensionConfigDiscoveryServicer(
            self.attestor,
            self.entitlement,  # a WorkloadSource as far as the servicer looks
            self.source if configured else None,
            unconfigured="no policies for the test",
        )
        self.server: grpc.aio.Server = self.call(self._start())

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        add_ecds_servicer(self.servicer, server)
        server.add_insecure_port(f"unix:{self.socket}")
        await server.start()
        return server

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on the server's loop (the source and the stats live there)."""

        async def inner() -> T:
            return fn(*args)

        return self.call(inner())

    def publish(
        self, configs: Mapping[str, Configs], errors: Mapping[str, str] | None = None
    ) -> Generation:
        return self.run(self.source.publish, configs, errors)

    def close(self) -> None:
        self.call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()
