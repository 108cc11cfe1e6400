"""The node API, server side: agents attest, then sync entries and get SVIDs signed.

Two listeners, because gRPC's Python server cannot make a client certificate optional:
attestation on a TLS port (the agent has no SVID yet; it verifies the server with its
bootstrap bundle), everything else on an mTLS port where the agent's SVID is required
and names the caller. The edge maps domain errors to status codes; nothing below it
knows about gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from identity.admin import IdentityAdmin
from identity.entries import Entry
from identity.entry_document import EntryDocument
from identity.errors import (
    AttestationError,
    ConflictError,
    IdentityError,
    InvalidInputError,
    NotFoundError,
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
from identity.spiffeid import parse_spiffe_id
from identity.store.agents import AttestedAgent, get_agent, save_agent
from identity.store.entries import current_revision
from identity.store.tokens import consume_token
from identity.x509certs import public_key_from_csr

__all__ = ["NodeAPI", "agent_id_of_peer"]

log = logging.getLogger(__name__)
_PEM = serialization.Encoding.PEM
_STATUS: tuple[tuple[type[IdentityError], grpc.StatusCode], ...] = (
    (AttestationError, grpc.StatusCode.PERMISSION_DENIED),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.ALREADY_EXISTS),
)
# Node certificates name a machine, not a web host: as with SPIRE's x509pop (Go's
# x509.Verify), a subjectAltName is allowed but not required. The verifier still
# checks the chain, validity and the clientAuth EKU.
_X509POP_LEAF_POLICY = ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
)


class NodeAPI:
    def __init__(
        self,
        *,
        admin: IdentityAdmin,
        clock: Callable[[], datetime],
        agent_svid_ttl: timedelta = timedelta(hours=1),
        x509pop_roots: Sequence[x509.Certificate] = (),
        sync_interval: float = 0.5,
    ) -> None:
        self._admin = admin
        self._clock = clock
        self._ttl = agent_svid_ttl
        self._x509pop_roots = tuple(x509pop_roots)
        self._interval = sync_interval
        self._td = admin.ca.trust_domain.as_spiffe_id()

    # -- handlers, by port -----------------------------------------------------------

    def attestation_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "AttestJoinToken": grpc.unary_unary_rpc_method_handler(
                    self._edge(self.attest_join_token),
                    request_deserializer=decoder(AttestJoinTokenRequest),
                    response_serializer=encode,
                ),
                "AttestX509Pop": grpc.stream_stream_rpc_method_handler(
                    self.attest_x509pop,
                    request_deserializer=decoder(X509PopRequest),
                    response_serializer=encode,
                ),
            },
        )

    def agent_handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "RenewAgent": grpc.unary_unary_rpc_method_handler(
                    self._edge(self.renew),
                    request_deserializer=decoder(RenewRequest),
                    response_serializer=encode,
                ),
                "Sync": grpc.unary_stream_rpc_method_handler(
                    self.sync, request_deserializer=decoder(SyncRequest), response_serializer=encode
                ),
                "SignX509SVIDs": grpc.unary_unary_rpc_method_handler(
                    self._edge(self.sign),
                    request_deserializer=decoder(SignRequest),
                    response_serializer=encode,
                ),
                "SignJWTSVID": grpc.unary_unary_rpc_method_handler(
                    self._edge(self.jwt_svid),
                    request_deserializer=decoder(JwtSvidRequest),
                    response_serializer=encode,
                ),
            },
        )

    # -- attestation -----------------------------------------------------------------

    async def attest_join_token(
        self, request: AttestJoinTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AttestResponse:
        public_key = public_key_from_csr(request.csr_pem.encode())
        token = await asyncio.to_thread(self._consume, request.token)
        if token is None:
            raise AttestationError("the join token is unknown, already used or expired")
        return await asyncio.to_thread(
            self._issue_agent,
            f"{self._td}/meshward/agent/join_token/{token}",
            public_key,
            "join_token",
        )

    async def attest_x509pop(
        self, requests: AsyncIterator[X509PopRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        """Proof of possession: a chain from a configured CA, then a signature over our nonce."""
        try:
            first = await anext(requests)
            chain = _certs(first.certificate_chain_pem or "", "certificate_chain_pem")
            leaf = self._verify_x509pop_chain(chain)
            nonce = secrets.token_bytes(32)
            yield X509PopChallenge(nonce_b64=base64.b64encode(nonce).decode())
            answer = await anext(requests)
            _check_signature(leaf, nonce, base64.b64decode(answer.signature_b64 or ""))
            public_key = public_key_from_csr((answer.csr_pem or "").encode())
            fingerprint = leaf.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - an ID, as SPIRE
            yield await asyncio.to_thread(
                self._issue_agent,
                f"{self._td}/meshward/agent/x509pop/{fingerprint}",
                public_key,
                "x509pop",
            )
        except StopAsyncIteration:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "x509pop: the agent stopped early"
            )
        except IdentityError as exc:
            await _abort(context, exc)

    def _verify_x509pop_chain(self, chain: list[x509.Certificate]) -> x509.Certificate:
        if not self._x509pop_roots:
            raise AttestationError("x509pop attestation is not enabled on this server")
        try:
            PolicyBuilder().store(Store(list(self._x509pop_roots))).time(
                self._clock()
            ).extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_X509POP_LEAF_POLICY
            ).build_client_verifier().verify(chain[0], chain[1:])
        except VerificationError as exc:
            raise AttestationError(f"the x509pop certificate does not verify: {exc}") from exc
        return chain[0]

    def _consume(self, token: str) -> str | None:
        with self._admin.db.transaction() as session:
            found = consume_token(session, token=token, now=self._clock())
        return None if found is None else found.id

    def _issue_agent(self, agent_id: str, public_key: Any, how: str) -> AttestResponse:
        issued = self._admin.ca.sign_x509_svid(
            public_key=public_key,
            spiffe_id=parse_spiffe_id(agent_id),
            ttl=self._ttl,
            issued_to=agent_id,
            now=self._clock(),
        )
        with self._admin.db.transaction() as session:
            previous = get_agent(session, spiffe_id=agent_id)
            if previous is not None and previous.banned:
                raise AttestationError(f"agent {agent_id} is banned")
            save_agent(
                session,
                agent=AttestedAgent(
                    spiffe_id=agent_id,
                    attestation_type=how,
                    certificate_serial=f"{issued.certificate.serial_number:x}",
                    expires_at=issued.certificate.not_valid_after_utc,
                    banned=False,
                ),
                now=self._clock(),
            )
        log.info("node: attested agent %s (%s)", agent_id, how)
        return AttestResponse(
            agent_id=agent_id,
            svid_pem="".join(c.public_bytes(_PEM).decode() for c in issued.chain),
            bundle_pem=self._admin.ca.bundle.pem().decode(),
        )

    # -- attested agents ---------------------------------------------------------------

    async def renew(
        self, request: RenewRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AttestResponse:
        agent = await self._caller(context)
        public_key = public_key_from_csr(request.csr_pem.encode())
        with self._admin.db.transaction() as session:
            record = get_agent(session, spiffe_id=agent)
        how = record.attestation_type if record else "renewal"
        return await asyncio.to_thread(self._issue_agent, agent, public_key, how)

    async def sync(
        self, request: SyncRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[SyncUpdate]:
        """Push what changed in the caller's entries (and the bundle), as soon as it changes."""
        try:
            agent = await self._caller(context)
        except IdentityError as exc:
            await _abort(context, exc)
        sent: dict[str, int] = {}
        sequence = -1
        seen: tuple[int, int] | None = None
        while True:
            revision = await asyncio.to_thread(self._revision)
            if revision != seen:
                seen = revision
                entries = await asyncio.to_thread(self._admin.list_entries, parent_id=agent)
                upserted = [e for e in entries if sent.get(e.id) != e.revision]
                deleted = sorted(set(sent) - {e.id for e in entries})
                bundle = self._admin.ca.bundle
                bundle_changed = bundle.sequence != sequence
                if upserted or deleted or bundle_changed or not sent:
                    yield SyncUpdate(
                        revision=revision[0],
                        upserted=[EntryDocument.of(e) for e in upserted],
                        deleted=deleted,
                        bundle_sequence=bundle.sequence,
                        bundle_pem=bundle.pem().decode() if bundle_changed else None,
                        jwt_keys=bundle.jwt_keys() if bundle_changed else None,
                    )
                    sent = {e.id: e.revision for e in entries}
                    sequence = bundle.sequence
            await asyncio.sleep(self._interval)

    def _revision(self) -> tuple[int, int]:
        with self._admin.db.transaction() as session:
            return current_revision(session), self._admin.ca.bundle.sequence

    async def sign(
        self, request: SignRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> SignResponse:
        agent = await self._caller(context)
        if len(request.entry_ids) != len(request.csrs_pem):
            raise InvalidInputError("one CSR per entry id", field="csrs_pem")
        return await asyncio.to_thread(self._sign_all, agent, request)

    def _sign_all(self, agent: str, request: SignRequest) -> SignResponse:
        svids = []
        for entry_id, csr in zip(request.entry_ids, request.csrs_pem, strict=True):
            entry = self._owned(agent, entry_id)
            issued = self._admin.ca.sign_x509_svid(
                public_key=public_key_from_csr(csr.encode()),
                spiffe_id=parse_spiffe_id(entry.spiffe_id),
                dns_names=entry.dns_names,
                ttl=timedelta(seconds=entry.x509_svid_ttl) if entry.x509_svid_ttl else None,
                issued_to=agent,
                now=self._clock(),
            )
            svids.append("".join(c.public_bytes(_PEM).decode() for c in issued.chain))
        return SignResponse(svids_pem=svids)

    async def jwt_svid(
        self, request: JwtSvidRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> JwtSvidResponse:
        agent = await self._caller(context)
        entries = await asyncio.to_thread(self._admin.list_entries, parent_id=agent)
        entry = next((e for e in entries if e.spiffe_id == request.spiffe_id), None)
        if entry is None:
            raise AttestationError(f"agent {agent} has no entry for {request.spiffe_id}")
        issued = await asyncio.to_thread(
            self._admin.ca.sign_jwt_svid,
            spiffe_id=parse_spiffe_id(entry.spiffe_id),
            audience=tuple(request.audience),
            ttl=timedelta(seconds=entry.jwt_svid_ttl) if entry.jwt_svid_ttl else None,
            now=self._clock(),
        )
        return JwtSvidResponse(token=issued.token)

    def _owned(self, agent: str, entry_id: str) -> Entry:
        entry = self._admin.get_entry(entry_id)
        if entry.parent_id != agent:
            raise AttestationError(f"entry {entry_id} does not belong to agent {agent}")
        return entry

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        agent = agent_id_of_peer(context.auth_context())
        with self._admin.db.transaction() as session:
            record = get_agent(session, spiffe_id=agent)
        if record is None:
            raise AttestationError(f"{agent} is not an attested agent")
        if record.banned:
            raise AttestationError(f"agent {agent} is banned")
        return agent

    def _edge(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                return await handler(request, context)
            except IdentityError as exc:
                await _abort(context, exc)

        return call


def agent_id_of_peer(auth_context: Mapping[str, Iterable[bytes]]) -> str:
    """The SPIFFE ID in the client certificate the mTLS handshake verified."""
    pems = list(auth_context.get("x509_pem_cert") or [])
    if not pems:
        raise AttestationError("no client certificate; attest first and call with the agent SVID")
    cert = x509.load_pem_x509_certificate(pems[0])
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise AttestationError("the client certificate has no SPIFFE ID") from exc
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or "/meshward/agent/" not in uris[0]:
        raise AttestationError("the client certificate is not an agent SVID")
    return uris[0]


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: IdentityError) -> None:
    code = next((c for t, c in _STATUS if isinstance(exc, t)), grpc.StatusCode.INTERNAL)
    if code is grpc.StatusCode.INTERNAL:
        log.error("node: %s", exc)
    await context.abort(code, str(exc))


def _certs(pem: str, field: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem.encode())
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise InvalidInputError("no PEM certificate", field=field) from exc


def _check_signature(leaf: x509.Certificate, nonce: bytes, signature: bytes) -> None:
    key = leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, nonce, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise AttestationError("x509pop supports EC and RSA keys")
    except InvalidSignature as exc:
        raise AttestationError("x509pop: the signature over the challenge does not verify") from exc
