"""The SPIFFE Workload API (service ``SpiffeWorkloadAPI``) for grpc.aio.

Depends only on three small protocols: who is calling (:class:`CallerAttestor`), what
the caller may have (:class:`WorkloadSource`) and a JWT-SVID signer. Domain errors are
mapped to gRPC status codes here and nowhere else: no security header →
INVALID_ARGUMENT, caller not identifiable → UNAUTHENTICATED, no identity for the caller
→ PERMISSION_DENIED, attestation machinery failing → UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from spiffe import JwtBundle, JwtSvid, TrustDomain

# py-spiffe ships the Workload API messages it speaks as a client; serving the very same
# descriptors keeps both ends byte-for-byte compatible.
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.errors import PySpiffeError
from spiffe.svid.errors import JwtSvidError

from identity.bundle import TrustBundle
from identity.errors import AttestationError
from identity.selectors import Selector
from identity.workload_attestation import CallerAttestor
from identity.workload_cache import Subscription, WorkloadSource, WorkloadUpdate

__all__ = ["SECURITY_HEADER", "JwtSigner", "WorkloadAPI"]

log = logging.getLogger(__name__)

SECURITY_HEADER = "workload.spiffe.io"
_DER = serialization.Encoding.DER
_PKCS8 = serialization.PrivateFormat.PKCS8


class JwtSigner(Protocol):
    async def __call__(self, *, spiffe_id: str, audience: tuple[str, ...]) -> str: ...


class WorkloadAPI(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self, *, attestor: CallerAttestor, source: WorkloadSource, sign_jwt: JwtSigner
    ) -> None:
        self._attestor = attestor
        self._source = source
        self._sign_jwt = sign_jwt

    async def FetchX509SVID(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for update in self._stream(context):
            yield workload_pb2.X509SVIDResponse(
                svids=[
                    workload_pb2.X509SVID(
                        spiffe_id=svid.spiffe_id,
                        x509_svid=b"".join(c.public_bytes(_DER) for c in svid.chain),
                        x509_svid_key=svid.key.private_bytes(
                            _DER, _PKCS8, serialization.NoEncryption()
                        ),
                        bundle=_x509_der(update.bundle),
                        hint=svid.hint,
                    )
                    for svid in update.svids
                ],
                federated_bundles={
                    TrustDomain(td).as_spiffe_id(): _x509_der(b)
                    for td, b in update.federated.items()
                },
            )

    async def FetchX509Bundles(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for update in self._stream(context):
            yield workload_pb2.X509BundlesResponse(
                bundles={td: _x509_der(b) for td, b in _all_bundles(update).items()}
            )

    async def FetchJWTBundles(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        async for update in self._stream(context):
            yield workload_pb2.JWTBundlesResponse(
                bundles={td: b.jwt_bundle_json() for td, b in _all_bundles(update).items()}
            )

    async def FetchJWTSVID(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        audience = tuple(request.audience)
        if not audience or any(not a for a in audience):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        update = await self._once(context)
        svids = [
            s for s in update.svids if not request.spiffe_id or s.spiffe_id == request.spiffe_id
        ]
        if not svids:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"no identity {request.spiffe_id} issued to the caller"
                if request.spiffe_id
                else "no identity issued",
            )
        return workload_pb2.JWTSVIDResponse(
            svids=[
                workload_pb2.JWTSVID(
                    spiffe_id=s.spiffe_id,
                    svid=await self._sign_jwt(spiffe_id=s.spiffe_id, audience=audience),
                    hint=s.hint,
                )
                for s in svids
            ]
        )

    async def ValidateJWTSVID(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        if not request.audience:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "svid must be specified")
        update = await self._once(context)
        try:
            header_sub = JwtSvid.parse_insecure(request.svid, {request.audience}).spiffe_id
            bundle = _all_bundles(update).get(header_sub.trust_domain.as_spiffe_id())
            if bundle is None:
                raise JwtSvidError(f"no bundle for trust domain {header_sub.trust_domain.name}")
            jwt_bundle = JwtBundle.parse(header_sub.trust_domain, bundle.jwt_bundle_json())
            svid = JwtSvid.parse_and_validate(request.svid, jwt_bundle, {request.audience})
        except (PySpiffeError, ValueError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}")
        claims = struct_pb2.Struct()
        # The signature was checked above; this only reads the claims back out.
        claims.update(jwt.decode(request.svid, options={"verify_signature": False}))
        return workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)

    # -- internals -------------------------------------------------------------------

    async def _selectors(self, context: grpc.aio.ServicerContext[Any, Any]) -> frozenset[Selector]:
        metadata = dict(context.invocation_metadata() or ())
        if metadata.get(SECURITY_HEADER) != "true":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
            )
        try:
            return await self._attestor.attest(context.peer())
        except AttestationError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, exc.message)
        except Exception:
            log.exception("workload api: attestation failed")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "could not verify existence of the caller"
            )
        raise AssertionError("unreachable: abort raises")

    async def _once(self, context: grpc.aio.ServicerContext[Any, Any]) -> WorkloadUpdate:
        subscription = self._source.subscribe(await self._selectors(context))
        try:
            return await _entitled(subscription.latest, context)
        finally:
            subscription.close()

    async def _stream(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[WorkloadUpdate]:
        """The caller's view now, then again on every change, until the caller leaves."""
        subscription: Subscription = self._source.subscribe(await self._selectors(context))
        try:
            update = await _entitled(subscription.latest, context)
            while True:
                yield update
                update = await _entitled(await subscription.changed(update.version), context)
        finally:
            subscription.close()


async def _entitled(
    update: WorkloadUpdate, context: grpc.aio.ServicerContext[Any, Any]
) -> WorkloadUpdate:
    if not update.svids:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
    return update


def _all_bundles(update: WorkloadUpdate) -> dict[str, TrustBundle]:
    bundles = {update.bundle.trust_domain.as_spiffe_id(): update.bundle}
    bundles.update({TrustDomain(td).as_spiffe_id(): b for td, b in update.federated.items()})
    return bundles


def _x509_der(bundle: TrustBundle) -> bytes:
    return b"".join(c.public_bytes(_DER) for c in bundle.x509_authorities)
