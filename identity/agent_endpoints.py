"""The agent socket: SPIFFE Workload API, Envoy SDS and ECDS, with gRPC health and reflection.

Workloads connect to ``socket`` (reachable by any user); the grpc.aio server itself
listens inside ``private_dir`` (0700) behind a :class:`PeerFront`, so every call is
attributed to the process that made it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import grpc
from envoy.service.extension.v3 import config_discovery_pb2
from envoy.service.secret.v3 import sds_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from spiffe._proto import workload_pb2, workload_pb2_grpc

from identity.ecds import ExtensionConfigDiscoveryServicer, add_ecds_servicer
from identity.extension_configs import ExtensionConfigSource
from identity.handshake_offload import HandshakeOffload
from identity.peer_front import MAX_CONNECTIONS_PER_UID, PeerFront
from identity.sds import SecretDiscoveryServicer, add_sds_servicer
from identity.workload_api import JwtSigner, WorkloadAPI
from identity.workload_attestation import ProcessAttestor, WorkloadAttestor
from identity.workload_cache import WorkloadSource

__all__ = ["MAX_STREAMS", "AgentEndpoints"]

MAX_STREAMS = 100  # per connection to the agent socket

_WORKLOAD_SERVICE = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"].full_name
_SDS_SERVICE = sds_pb2.DESCRIPTOR.services_by_name["SecretDiscoveryService"].full_name
_ECDS_SERVICE = config_discovery_pb2.DESCRIPTOR.services_by_name[
    "ExtensionConfigDiscoveryService"
].full_name


class AgentEndpoints:
    def __init__(
        self,
        *,
        socket: Path,
        private_dir: Path,
        attestors: Sequence[ProcessAttestor],
        source: WorkloadSource,
        sign_jwt: JwtSigner,
        disable_spiffe_cert_validation: bool = False,
        offload: HandshakeOffload | None = None,
        extension_configs: ExtensionConfigSource | None = None,
        no_extension_configs: str = "this agent serves no extension configs",
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
    ) -> None:
        """``extension_configs`` is what ECDS serves; without it ECDS refuses every call
        with ``no_extension_configs`` (which should say how to configure it)."""
        self.socket = socket
        self._private_dir = private_dir
        self._inner = private_dir / "grpc.sock"
        self.front = PeerFront(
            listen=socket,
            upstream=self._inner,
            tag_dir=private_dir / "peers",
            max_per_uid=max_connections_per_uid,
        )
        self.attestor = WorkloadAttestor(self.front, attestors)
        self._source = source
        self._sign_jwt = sign_jwt
        self.sds = SecretDiscoveryServicer(
            self.attestor,
            source,
            disable_spiffe_cert_validation=disable_spiffe_cert_validation,
            offload=offload,
        )
        self.ecds = ExtensionConfigDiscoveryServicer(
            self.attestor, source, extension_configs, unconfigured=no_extension_configs
        )
        self._server: grpc.aio.Server | None = None
        self.health = health_aio.HealthServicer()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Start serving; ``sock`` is the agent socket if the caller bound it already."""
        self._private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._private_dir, 0o700)
        self._inner.unlink(missing_ok=True)
        # Streams one connection may hold (grpc's default is unbounded): with the front's
        # per-uid connection limit, what one local user can make the agent hold is bounded.
        server = grpc.aio.server(options=[("grpc.max_concurrent_streams", MAX_STREAMS)])
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(  # type: ignore[no-untyped-call]
            WorkloadAPI(attestor=self.attestor, source=self._source, sign_jwt=self._sign_jwt),
            server,
        )
        add_sds_servicer(self.sds, server)
        add_ecds_servicer(self.ecds, server)
        names = [_WORKLOAD_SERVICE, _SDS_SERVICE, _ECDS_SERVICE]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        names.append(reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        server.add_insecure_port(f"unix:{self._inner}")
        await server.start()
        self._server = server
        await self.front.start(sock)
        for name in ("", *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 1.0) -> None:
        await self.front.close()
        if self._server is not None:
            await self._server.stop(grace)
        self._inner.unlink(missing_ok=True)
