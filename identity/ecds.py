"""Envoy ECDS (``envoy.service.extension.v3.ExtensionConfigDiscoveryService``) on the agent socket.

Resources are ``TypedExtensionConfig`` by name, built for the workload the Envoy's node
metadata describes (:mod:`identity.extension_configs`). Which names exist and what they
hold is the :class:`ExtensionConfigSource`'s business; the agent wires in the Istio
policies as Envoy RBAC filters, one resource (``meshward.rbac.http``) per sidecar chain so
that a policy change switches a sidecar at once (``authz.rbac_chain``). No network
(TCP) filters are served: Envoy has no composite filter for network filters, so a chain
of four could not switch atomically.

The protocol (versions are content digests, ACK/NACK, nonces, reconnects) is the one SDS
uses, from :mod:`identity.xds`; so a generation of the source that leaves a workload's
configs as they were sends nothing to its Envoys, and only the sidecars whose configs
changed get a push. Who may ask is SDS's rule too: a caller the agent attests and that
matches a registration entry (a sidecar needs one for its certificate anyway).

Failures, each reported and never guessed around:

- a request the agent cannot answer (no policy directory configured, no policy set
  loaded, a policy the workload's filters cannot express) ends the call with
  ``FAILED_PRECONDITION`` and the source's message, which Envoy logs; a node without
  ``meshward.workload`` or an unknown name gets ``INVALID_ARGUMENT``. An Envoy with no
  config yet stays unready (its listener waits for the filter), one with a config keeps it.
- a new generation the workload's configs cannot be built from is not pushed: the
  Envoy keeps its last good configs, and :attr:`EcdsStats.envoys` says so.
- a NACK: the Envoy keeps its last good configs, the rejected version is not sent again
  on that stream, and it is logged once per Envoy and version, counted, and listed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NoReturn, TypeAlias

import grpc
from envoy.config.core.v3 import extension_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.extension.v3 import config_discovery_pb2_grpc

from identity.errors import (
    AttestationError,
    ExtensionConfigError,
    IdentityError,
    InvalidInputError,
)
from identity.extension_configs import (
    EnvoyWorkload,
    ExtensionConfigs,
    ExtensionConfigSource,
    authz_mode,
    envoy_workload,
)
from identity.selectors import Selector
from identity.workload_attestation import CallerAttestor
from identity.workload_cache import WorkloadSource
from identity.xds import DeltaStream, OnNack, Rejection, Render, ResourceKind, SotwStream
from identity.xds_transport import serve_stream

__all__ = [
    "EXTENSION_CONFIGS",
    "EXTENSION_CONFIG_TYPE_URL",
    "EcdsEnvoy",
    "EcdsStats",
    "ExtensionConfigDiscoveryServicer",
    "add_ecds_servicer",
    "extension_version",
    "render_configs",
]

log = logging.getLogger(__name__)

EXTENSION_CONFIG_TYPE_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
_LOGGED_NACKS_MAX = 4096  # bounds the memory of "already logged" across Envoys

Config: TypeAlias = extension_pb2.TypedExtensionConfig
_Render = Render[ExtensionConfigs, Config]
_Stream = SotwStream[Config, ExtensionConfigs] | DeltaStream[Config, ExtensionConfigs]


def extension_version(config: Config) -> str:
    """A digest of one config: equal digests, equal configs, on every stream."""
    digest = hashlib.sha256(b"meshward-ecds-resource\0")
    digest.update(config.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


EXTENSION_CONFIGS: ResourceKind[Config] = ResourceKind(
    EXTENSION_CONFIG_TYPE_URL, "ecds", extension_version
)


def render_configs(
    workload: EnvoyWorkload, names: Sequence[str], configs: ExtensionConfigs
) -> dict[str, Config]:
    """The requested names (none: all) for ``workload``; unknown names are an error."""
    available = configs.for_workload(workload)
    if not names:
        return dict(available)
    unknown = [n for n in dict.fromkeys(names) if n not in available]
    if unknown:
        raise InvalidInputError(
            f"no extension config named {', '.join(map(repr, unknown))}; this agent serves "
            f"{', '.join(map(repr, sorted(available))) or 'none'} for {workload}"
        )
    return {name: available[name] for name in dict.fromkeys(names)}


@dataclass(slots=True)
class EcdsEnvoy:
    """One Envoy's stream, for reports: what it runs, what it refused, what it lacks."""

    node: str
    workload: EnvoyWorkload
    mode: str | None
    stream: _Stream
    unserved: str | None = None  # why the latest generation was not pushed to it

    @property
    def rejected(self) -> Rejection | None:
        return self.stream.rejected

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "envoy": self.node,
            "workload": self.workload.as_json(),
            "authz_mode": self.mode,
            "version": self.stream.acked,
        }
        if self.stream.rejected is not None:
            out["rejected"] = {
                "version": self.stream.rejected.version,
                "message": self.stream.rejected.message,
            }
        if self.unserved is not None:
            out["not_updated"] = self.unserved
        return out


@dataclass(slots=True)
class EcdsStats:
    """Counters for /metrics and the open streams for /ready; event loop only."""

    streams: int = 0
    responses: int = 0
    nacks: int = 0
    denied: int = 0  # callers refused for lack of attestation or entitlement
    refused: int = 0  # calls ended because the configs could not be built
    envoys: dict[int, EcdsEnvoy] = field(default_factory=dict)

    def open_streams(self) -> tuple[EcdsEnvoy, ...]:
        # One C-level copy: /ready reads this from a worker thread.
        return tuple(self.envoys.values())


class ExtensionConfigDiscoveryServicer:
    """The three ECDS RPCs for grpc.aio; register with :func:`add_ecds_servicer`."""

    def __init__(
        self,
        attestor: CallerAttestor,
        entitlement: WorkloadSource,
        source: ExtensionConfigSource | None,
        *,
        unconfigured: str = "this agent serves no extension configs",
    ) -> None:
        self._attestor = attestor
        self._entitlement = entitlement
        self._source = source
        self._unconfigured = unconfigured  # what to tell an Envoy when source is None
        self.stats = EcdsStats()
        self._ids = itertools.count(1)
        self._logged_nacks: set[tuple[str, str | None]] = set()

    async def StreamExtensionConfigs(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        def make(render: _Render, on_nack: OnNack[Config]) -> _Stream:
            return SotwStream(render, on_nack=on_nack, kind=EXTENSION_CONFIGS)

        await self._run(requests, context, make)

    async def DeltaExtensionConfigs(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        def make(render: _Render, on_nack: OnNack[Config]) -> _Stream:
            return DeltaStream(render, on_nack=on_nack, kind=EXTENSION_CONFIGS)

        await self._run(requests, context, make)

    async def FetchExtensionConfigs(
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> discovery_pb2.DiscoveryResponse:
        source = await self._admit(context)
        try:
            EXTENSION_CONFIGS.check_type(request.type_url)
            workload = envoy_workload(request.node)
            configs = render_configs(workload, tuple(request.resource_names), source.latest)
        except IdentityError as exc:
            await self._fail(context, exc)
        self.stats.responses += 1
        response = discovery_pb2.DiscoveryResponse(
            version_info=EXTENSION_CONFIGS.collection_version(configs),
            type_url=EXTENSION_CONFIG_TYPE_URL,
        )
        for config in configs.values():
            response.resources.add().Pack(config)
        return response

    # -- internals ------------------------------------------------------------------------

    async def _run(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext[Any, Any],
        make: Callable[[_Render, OnNack[Config]], _Stream],
    ) -> None:
        """Serve one stream; it starts at the first request, the only one naming the node."""
        source = await self._admit(context)
        key = next(self._ids)
        self.stats.streams += 1
        envoys: list[EcdsEnvoy] = []

        def on_request(request: Any, configs: ExtensionConfigs) -> Any:
            first = not envoys
            if first:
                node = request.node
                workload = envoy_workload(node)  # InvalidInputError ends the call

                def on_nack(rejected: Mapping[str, Config], message: str) -> bool:
                    return self._nack(envoys[0], rejected, message)

                stream = make(partial(render_configs, workload), on_nack)
                envoys.append(EcdsEnvoy(node.id or "(no id)", workload, authz_mode(node), stream))
                self.stats.envoys[key] = envoys[0]
            envoy = envoys[0]
            before = envoy.stream.nacks
            try:
                response = envoy.stream.on_request(request, configs)
            except ExtensionConfigError as exc:
                if first:
                    raise  # nothing to keep: the call ends, saying why
                # An ACK, NACK or new name on a stream that has served: the Envoy keeps
                # what it has, as when the generation arrived (on_update below).
                envoy.unserved = exc.message
                return None
            finally:
                self.stats.nacks += envoy.stream.nacks - before
            envoy.unserved = None
            return response

        def on_update(configs: ExtensionConfigs) -> Any:
            if not envoys:
                return None
            envoy = envoys[0]
            try:
                response = envoy.stream.on_update(configs)
            except ExtensionConfigError as exc:
                # Not pushed: the Envoy keeps its last good configs (the source logs why).
                envoy.unserved = exc.message
                return None
            envoy.unserved = None
            return response

        def sent() -> None:
            self.stats.responses += 1

        try:
            await serve_stream(
                requests,
                context,
                source,
                on_request=on_request,
                on_update=on_update,
                fail=partial(self._fail, context),
                sent=sent,
            )
        finally:
            self.stats.envoys.pop(key, None)

    def _nack(self, envoy: EcdsEnvoy, rejected: Mapping[str, Config], message: str) -> bool:
        """Log a rejection once per Envoy and version (a reconnecting Envoy repeats it)."""
        version = EXTENSION_CONFIGS.collection_version(rejected) if rejected else None
        key = (envoy.node, version)
        if key in self._logged_nacks:
            return True
        if len(self._logged_nacks) >= _LOGGED_NACKS_MAX:
            self._logged_nacks.clear()
        self._logged_nacks.add(key)
        log.warning(
            "ecds: Envoy %s (%s) rejected %s version %s and keeps %s: %s",
            envoy.node,
            envoy.workload,
            ", ".join(sorted(rejected)) or "a response",
            version,
            envoy.stream.acked or "nothing",
            message,
        )
        return True

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> ExtensionConfigSource:
        """Attest the caller and check it is a registered workload; the source to serve."""
        try:
            selectors = await self._attestor.attest(context.peer())
        except AttestationError as exc:
            self.stats.denied += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"ecds: {exc}")
        if not self._entitled(selectors):
            self.stats.denied += 1
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "ecds: no registration entry matches this caller "
                f"(selectors: {', '.join(sorted(map(str, selectors))) or 'none'})",
            )
        if self._source is None:
            self.stats.refused += 1
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"ecds: {self._unconfigured}")
        return self._source

    def _entitled(self, selectors: frozenset[Selector]) -> bool:
        subscription = self._entitlement.subscribe(selectors)
        try:
            return bool(subscription.latest.svids)
        finally:
            subscription.close()

    async def _fail(
        self, context: grpc.aio.ServicerContext[Any, Any], exc: IdentityError
    ) -> NoReturn:
        code = (
            grpc.StatusCode.FAILED_PRECONDITION
            if isinstance(exc, ExtensionConfigError)
            else grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, InvalidInputError)
            else grpc.StatusCode.INTERNAL
        )
        self.stats.refused += 1
        log.info("ecds: ending the call: %s", exc.message)
        # One line: Envoy logs the status message as it came (a newline shows as %0A).
        await context.abort(code, "ecds: " + " ".join(s.strip() for s in exc.message.splitlines()))


def add_ecds_servicer(servicer: ExtensionConfigDiscoveryServicer, server: grpc.aio.Server) -> None:
    config_discovery_pb2_grpc.add_ExtensionConfigDiscoveryServiceServicer_to_server(
        servicer, server
    )
