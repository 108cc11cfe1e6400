"""The authz server's own X509-SVID, from the agent's Workload API, as gRPC server credentials.

:class:`WorkloadSvidWatcher` keeps a Workload API stream open (py-spiffe's client) and
restarts it after any error, so an entry registered after the process started, or an
agent that restarts, is picked up without restarting authz. Every update is turned into
a frozen :class:`ServingIdentity` and handed to :class:`SvidCredentials`, whose
certificate-configuration fetcher gRPC calls at each new TLS handshake: a rotated SVID or
bundle is served from the next connection on, with no restart and no dropped connection.

The private key exists only in memory (it is never written to disk, logged, or shown in
a ``repr``); gRPC gets it as PEM bytes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

__all__ = ["ServingIdentity", "SvidCredentials", "WorkloadSvidWatcher", "identity_from_context"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class ServingIdentity:
    spiffe_id: str
    serial: int
    not_after: datetime
    chain_pem: bytes  # leaf first, then intermediates
    roots_pem: bytes  # every X.509 authority of every bundle: who may be a client
    key_pem: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.chain_pem or not self.roots_pem or not self.key_pem:
            raise ValueError("a serving identity needs a chain, a key and at least one root")


def identity_from_context(context: Any) -> ServingIdentity:
    """The default SVID and all bundles of a py-spiffe ``X509Context``."""
    svid = context.default_svid
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
    roots = sorted(
        authority.public_bytes(serialization.Encoding.PEM)
        for bundle in context.x509_bundle_set.bundles
        for authority in bundle.x509_authorities
    )
    key = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ServingIdentity(
        spiffe_id=str(svid.spiffe_id),
        serial=svid.leaf.serial_number,
        not_after=svid.leaf.not_valid_after_utc,
        chain_pem=chain,
        roots_pem=b"".join(roots),
        key_pem=key,
    )


class SvidCredentials:
    """The newest identity, served to gRPC at each handshake; clients must present an SVID."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: ServingIdentity | None = None
        self._served: ServingIdentity | None = None

    @property
    def current(self) -> ServingIdentity | None:
        return self._current

    def update(self, identity: ServingIdentity) -> None:
        # Called from py-spiffe's stream thread; gRPC reads from its own threads.
        with self._lock:
            self._current = identity

    def server_credentials(self) -> grpc.ServerCredentials:
        with self._lock:
            if self._current is None:
                raise RuntimeError("no X509-SVID yet: wait for the first one before serving")
            self._served = self._current
            initial = _configuration(self._current)
        # The stubs say the fetcher must return a configuration; gRPC documents None as
        # "keep the current one", which is what every handshake without a rotation wants.
        fetch: Any = self._fetch
        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=True
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # None tells gRPC to keep the configuration it has; anything raised here would
        # fail the handshake, so there is nothing that can raise.
        with self._lock:
            if self._current is None or self._current is self._served:
                return None
            self._served = self._current
            return _configuration(self._current)


def _configuration(identity: ServingIdentity) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(identity.key_pem, identity.chain_pem)], root_certificates=identity.roots_pem
    )


class WorkloadSvidWatcher:
    """Streams this process's X509 context from the Workload API into ``credentials``."""

    def __init__(
        self,
        socket: str,
        credentials: SvidCredentials,
        *,
        client_factory: Callable[[str], Any] | None = None,
        max_backoff: float = 5.0,
    ) -> None:
        self.socket = socket
        self._credentials = credentials
        self._client_factory = client_factory or _workload_api_client
        self._max_backoff = max_backoff
        self._arrived = asyncio.Event()
        self.last_error: str | None = None  # why there is no (new) SVID, for /ready and logs

    async def first(self) -> ServingIdentity:
        """Wait for the first SVID while :meth:`run` runs (the caller bounds the wait)."""
        await self._arrived.wait()
        identity = self._credentials.current
        assert identity is not None
        return identity

    async def run(self) -> None:
        """Until cancelled: stream, and after any error or end of stream, reconnect."""
        loop = asyncio.get_running_loop()
        arrived = self._arrived
        backoff = 0.2
        reported: str | None = None
        while True:
            failed = asyncio.Event()
            client = None
            handler = None
            updated = False

            def on_update(context: Any) -> None:
                nonlocal updated
                try:
                    identity = identity_from_context(context)
                except Exception as exc:  # a malformed update must not end the stream thread
                    self.last_error = f"unusable X509-SVID from the Workload API ({exc})"
                    log.error("authz tls: %s", self.last_error)
                    return
                previous = self._credentials.current
                self._credentials.update(identity)
                self.last_error = None
                updated = True
                if previous is None or previous.serial != identity.serial:
                    log.info(
                        "authz tls: serving as %s (serial %x, until %s)",
                        identity.spiffe_id,
                        identity.serial,
                        identity.not_after.isoformat(),
                    )
                loop.call_soon_threadsafe(arrived.set)

            def on_error(exc: Exception, failed: asyncio.Event = failed) -> None:
                self.last_error = f"Workload API at {self.socket}: {exc}"
                loop.call_soon_threadsafe(failed.set)

            try:
                client = await asyncio.to_thread(self._client_factory, self.socket)
                # py-spiffe's own retries would hide why no SVID comes (no entry yet, agent
                # down): every error ends up here instead, recorded for /ready.
                handler = client.stream_x509_contexts(on_update, on_error, retry_connect=False)
                await failed.wait()
            except Exception as exc:
                # py-spiffe refuses to build a client while the socket does not exist yet.
                self.last_error = f"Workload API at {self.socket}: {exc}"
            finally:
                if handler is not None:
                    handler.cancel()
                if client is not None:
                    await asyncio.to_thread(client.close)
            backoff = 0.2 if updated else min(backoff * 2, self._max_backoff)
            # Once per distinct problem: waiting for an entry must not flood the log.
            level = logging.DEBUG if self.last_error == reported else logging.WARNING
            log.log(level, "authz tls: %s; retrying in %.1fs", self.last_error, backoff)
            reported = self.last_error
            await asyncio.sleep(backoff)


def _workload_api_client(socket: str) -> Any:
    from spiffe import WorkloadApiClient

    return WorkloadApiClient(socket_path=f"unix://{socket}" if socket.startswith("/") else socket)
