"""The server's own TLS identity for the node API, renewed without restarting listeners.

The server holds an X509-SVID for ``spiffe://<td>/meshward/server`` with the DNS SAN
:data:`SERVER_NAME`, which agents pin with gRPC's target-name override (gRPC's Python
client cannot check a URI SAN). Entries and mints may not claim that name. The key lives
only in this process. gRPC asks the credentials on each handshake, so a renewed
SVID or a changed bundle (the roots agents' certificates are verified against) takes
effect for new connections at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta

import grpc
from cryptography.hazmat.primitives import serialization

from identity.authority import CertificateAuthority
from identity.entries import RESERVED_DNS_NAME
from identity.keys import KeyType, generate_key
from identity.spiffeid import parse_spiffe_id

__all__ = ["SERVER_NAME", "ServerTLS"]

SERVER_NAME = RESERVED_DNS_NAME
_PEM = serialization.Encoding.PEM


class ServerTLS:
    def __init__(
        self, ca: CertificateAuthority, *, clock: Callable[[], datetime], ttl: timedelta
    ) -> None:
        self._ca = ca
        self._clock = clock
        self._ttl = ttl
        self.spiffe_id = f"{ca.trust_domain.as_spiffe_id()}/meshward/server"
        self._lock = threading.Lock()
        self._renew_at = clock()
        self._pair: tuple[bytes, bytes] = (b"", b"")
        self._roots = b""
        self._version = 0
        self.refresh()

    def refresh(self) -> None:
        """Renew the SVID at half its life; pick up a new bundle. Cheap when nothing is due."""
        now = self._clock()
        with self._lock:
            roots = self._ca.bundle.pem()
            if now >= self._renew_at:
                key = generate_key(KeyType.EC_P256)
                issued = self._ca.sign_x509_svid(
                    public_key=key.public_key(),
                    spiffe_id=parse_spiffe_id(self.spiffe_id),
                    dns_names=(SERVER_NAME,),
                    ttl=self._ttl,
                    issued_to="meshward-server",
                    now=now,
                )
                leaf = issued.certificate
                self._renew_at = now + (leaf.not_valid_after_utc - now) / 2
                self._pair = (
                    key.private_bytes(
                        _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                    ),
                    b"".join(c.public_bytes(_PEM) for c in issued.chain),
                )
                self._version += 1
            if roots != self._roots:
                self._roots = roots
                self._version += 1

    def credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials:
        seen = self._version

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # gRPC asks on every handshake; answer only when something changed.
            nonlocal seen
            if self._version == seen:
                return None
            seen = self._version
            return self._configuration()

        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            fetch,  # type: ignore[arg-type]  # the stubs miss that None means "unchanged"
            require_client_authentication=require_client_auth,
        )

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            return grpc.ssl_server_certificate_configuration([self._pair], self._roots)
