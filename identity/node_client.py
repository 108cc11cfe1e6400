"""The node API, agent side: attest once, then sync and sign over mTLS with the agent SVID.

The agent SVID and its key are kept in the agent's private directory (key 0600), with
the latest bundle, so a restarted agent resumes without a new join token. The server is
verified against the bootstrap bundle the first time and against the synced bundle
after that; gRPC's Python client cannot check a URI SAN, so the agent pins the DNS SAN
only the server's certificate may carry (identity.server_tls).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import BaseModel
from spiffe import TrustDomain

from identity.agent import SigningRequest
from identity.bundle import JwtAuthority, TrustBundle
from identity.entries import Entry
from identity.errors import AttestationError
from identity.keys import (
    KeyType,
    PrivateKey,
    PublicKey,
    generate_key,
    load_private_key,
    signature_hash,
    write_private_key,
)
from identity.node_messages import (
    SERVICE,
    AttestJoinTokenRequest,
    AttestResponse,
    JwtSvidRequest,
    JwtSvidResponse,
    RenewRequest,
    SignRequest,
    SignResponse,
    SyncRequest,
    SyncUpdate,
    X509PopChallenge,
    X509PopRequest,
    decoder,
    encode,
)
from identity.server_tls import SERVER_NAME

__all__ = ["AgentIdentity", "NodeBackend", "attest_join_token", "attest_x509pop"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_PEM = serialization.Encoding.PEM
_OPTIONS = (("grpc.ssl_target_name_override", SERVER_NAME),)


@dataclass(slots=True)
class AgentIdentity:
    """The agent's SVID, key and latest bundle, persisted in ``directory``."""

    directory: Path
    agent_id: str
    chain_pem: bytes
    key: PrivateKey
    bundle_pem: bytes

    @classmethod
    def load(cls, directory: Path) -> AgentIdentity | None:
        try:
            chain_pem = (directory / "agent-svid.pem").read_bytes()
            key = load_private_key((directory / "agent-svid.key.pem").read_bytes())
            bundle_pem = (directory / "bundle.pem").read_bytes()
        except FileNotFoundError:
            return None
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
        return cls(directory, _uri(leaf), chain_pem, key, bundle_pem)

    def save(self) -> None:
        write_private_key(self.directory / "agent-svid.key.pem", self.key)
        (self.directory / "agent-svid.pem").write_bytes(self.chain_pem)
        (self.directory / "bundle.pem").write_bytes(self.bundle_pem)

    @property
    def leaf(self) -> x509.Certificate:
        return x509.load_pem_x509_certificates(self.chain_pem)[0]

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.bundle_pem,
            private_key=self.key.private_bytes(
                _PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            certificate_chain=self.chain_pem,
        )


async def attest_join_token(
    *, address: str, bootstrap_bundle: bytes, token: str, directory: Path
) -> AgentIdentity:
    key = generate_key(KeyType.EC_P256)
    async with grpc.aio.secure_channel(
        address, grpc.ssl_channel_credentials(bootstrap_bundle), options=_OPTIONS
    ) as channel:
        response = await _unary(
            channel,
            "AttestJoinToken",
            AttestJoinTokenRequest(token=token, csr_pem=_csr(key)),
            AttestResponse,
        )
    return _identity(directory, response, key)


async def attest_x509pop(
    *,
    address: str,
    bootstrap_bundle: bytes,
    chain_pem: bytes,
    key: PrivateKey,
    directory: Path,
) -> AgentIdentity:
    agent_key = generate_key(KeyType.EC_P256)
    async with grpc.aio.secure_channel(
        address, grpc.ssl_channel_credentials(bootstrap_bundle), options=_OPTIONS
    ) as channel:
        call = channel.stream_stream(
            f"/{SERVICE}/AttestX509Pop",
            request_serializer=encode,
            response_deserializer=_any_of(X509PopChallenge, AttestResponse),
        )()
        await call.write(X509PopRequest(certificate_chain_pem=chain_pem.decode()))
        challenge = await call.read()
        if not isinstance(challenge, X509PopChallenge):
            raise AttestationError("x509pop: the server did not send a challenge")
        nonce = base64.b64decode(challenge.nonce_b64)
        await call.write(
            X509PopRequest(
                signature_b64=base64.b64encode(_sign(key, nonce)).decode(),
                csr_pem=_csr(agent_key),
            )
        )
        response = await call.read()
        await call.done_writing()
        if not isinstance(response, AttestResponse):
            raise AttestationError("x509pop: the server did not issue an agent SVID")
    return _identity(directory, response, agent_key)


class NodeBackend:
    """:class:`identity.agent.AgentBackend` over the node API, fed by one Sync stream."""

    def __init__(
        self,
        *,
        address: str,
        identity: AgentIdentity,
        clock: Callable[[], datetime],
    ) -> None:
        self.identity = identity
        self._address = address
        self._clock = clock
        self._channel = grpc.aio.secure_channel(address, identity.credentials(), options=_OPTIONS)
        self._entries: dict[str, Entry] = {}
        self._bundle: TrustBundle | None = None
        self._revision = -1
        self._synced = asyncio.Event()
        self.trust_domain = TrustDomain(identity.agent_id.split("/")[2])

    async def close(self) -> None:
        await self._channel.close()

    # -- AgentBackend ----------------------------------------------------------------

    async def revision(self) -> object:
        await self._wait_synced()
        assert self._bundle is not None
        return (self._revision, self._bundle.sequence)

    async def entries(self) -> Sequence[Entry]:
        await self._wait_synced()
        return list(self._entries.values())

    async def bundle(self) -> TrustBundle:
        await self._wait_synced()
        assert self._bundle is not None
        return self._bundle

    async def sign_x509_svids(
        self, requests: Sequence[SigningRequest]
    ) -> Sequence[tuple[x509.Certificate, ...]]:
        response = await _unary(
            self._channel,
            "SignX509SVIDs",
            SignRequest(
                entry_ids=[r.entry.id for r in requests], csrs_pem=[_csr(r.key) for r in requests]
            ),
            SignResponse,
        )
        return [tuple(x509.load_pem_x509_certificates(p.encode())) for p in response.svids_pem]

    async def sign_jwt_svid(self, *, spiffe_id: str, audience: tuple[str, ...]) -> str:
        response = await _unary(
            self._channel,
            "SignJWTSVID",
            JwtSvidRequest(spiffe_id=spiffe_id, audience=list(audience)),
            JwtSvidResponse,
        )
        return response.token

    # -- background work ---------------------------------------------------------------

    async def run(self) -> None:
        """Keep the Sync stream open (reconnecting with backoff) and the agent SVID fresh."""
        await asyncio.gather(self._sync_forever(), self._renew_forever())

    async def _sync_forever(self) -> None:
        backoff = 0.5
        while True:
            try:
                call = self._channel.unary_stream(
                    f"/{SERVICE}/Sync",
                    request_serializer=encode,
                    response_deserializer=decoder(SyncUpdate),
                )(SyncRequest())
                first = True
                async for update in call:
                    self._apply(update, replace=first)
                    first = False
                    backoff = 0.5
            except grpc.aio.AioRpcError as exc:
                log.warning("agent: sync stream to %s: %s", self._address, exc.details())
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _renew_forever(self) -> None:
        while True:
            leaf = self.identity.leaf
            now = self._clock()
            renew_at = now + (leaf.not_valid_after_utc - now) / 2
            await asyncio.sleep(max((renew_at - now).total_seconds(), 1.0))
            try:
                key = generate_key(KeyType.EC_P256)
                response = await _unary(
                    self._channel, "RenewAgent", RenewRequest(csr_pem=_csr(key)), AttestResponse
                )
            except grpc.aio.AioRpcError as exc:
                log.warning("agent: renewing the agent SVID failed: %s", exc.details())
                continue
            self.identity = _identity(self.identity.directory, response, key)
            old = self._channel
            self._channel = grpc.aio.secure_channel(
                self._address, self.identity.credentials(), options=_OPTIONS
            )
            await old.close(grace=5)
            log.info(
                "agent: renewed the agent SVID (until %s)", self.identity.leaf.not_valid_after_utc
            )

    def _apply(self, update: SyncUpdate, *, replace: bool) -> None:
        if replace:
            self._entries = {}
        for message in update.upserted:
            self._entries[message.id] = message.to_entry()
        for entry_id in update.deleted:
            self._entries.pop(entry_id, None)
        if update.bundle_pem is not None:
            self._bundle = TrustBundle(
                trust_domain=self.trust_domain,
                x509_authorities=tuple(x509.load_pem_x509_certificates(update.bundle_pem.encode())),
                jwt_authorities=tuple(_jwt_authority(k) for k in update.jwt_keys or ()),
                sequence=update.bundle_sequence,
                refresh_hint_seconds=0,
            )
            # Next start verifies the server against what it trusts now, not the bootstrap.
            self.identity.bundle_pem = update.bundle_pem.encode()
            self.identity.save()
        self._revision = update.revision
        self._synced.set()

    async def _wait_synced(self) -> None:
        await asyncio.wait_for(self._synced.wait(), timeout=30)


async def _unary(channel: grpc.aio.Channel, method: str, request: BaseModel, reply: type[M]) -> M:
    call = channel.unary_unary(
        f"/{SERVICE}/{method}", request_serializer=encode, response_deserializer=decoder(reply)
    )
    result: M = await call(request, timeout=30)
    return result


def _any_of(*models: type[BaseModel]) -> Callable[[bytes], Any]:
    decoders = [decoder(m) for m in models]

    def decode(data: bytes) -> Any:
        for d in decoders:
            try:
                return d(data)
            except ValueError:
                continue
        raise ValueError("unexpected message from the server")

    return decode


def _identity(directory: Path, response: AttestResponse, key: PrivateKey) -> AgentIdentity:
    identity = AgentIdentity(
        directory=directory,
        agent_id=response.agent_id,
        chain_pem=response.svid_pem.encode(),
        key=key,
        bundle_pem=response.bundle_pem.encode(),
    )
    identity.save()
    return identity


def _csr(key: PrivateKey) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshward")]))
        .sign(key, signature_hash(key))
    )
    return csr.public_bytes(_PEM).decode()


def _sign(key: PrivateKey, data: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _uri(cert: x509.Certificate) -> str:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(sans.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _jwt_authority(jwk: dict[str, Any]) -> JwtAuthority:
    algorithm = ECAlgorithm if jwk.get("kty") == "EC" else RSAAlgorithm
    key: PublicKey = algorithm.from_jwk(jwk)  # type: ignore[assignment]
    return JwtAuthority(key_id=str(jwk["kid"]), public_key=key)
