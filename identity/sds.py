"""Envoy SDS (``envoy.service.secret.v3.SecretDiscoveryService``) on the agent socket.

Resource names are SPIRE's, so Envoy configs written for SPIRE work unchanged:

=====================  =============================================================
``default``            the caller's first SVID (TLS certificate)
``ROOTCA``             the local trust bundle (validation context)
``ALL``                every bundle, local and federated (validation context)
a SPIFFE ID            that SVID, when the caller is entitled to it
``spiffe://<td>``      that trust domain's bundle (local or federated)
no names (wildcard)    every bundle under its trust domain ID and every SVID under its ID
=====================  =============================================================

Validation contexts use Envoy's SPIFFE certificate validator
(``envoy.tls.cert_validator.spiffe``), one trust domain entry per bundle, so a CA of
one trust domain cannot vouch for IDs of another. Like SPIRE, an Envoy opts out per node
with the node metadata ``disable_spiffe_cert_validation: true`` (a bool, or a string Go's
``strconv.ParseBool`` accepts; other values are ignored), the agent may opt out for all,
and Envoy older than 1.18 (no SPIFFE validator) gets plain ``trusted_ca`` too. ``ALL``
then fails: merging several trust domains' roots into one ``trusted_ca`` would drop that
separation, so, as in SPIRE, it is refused.

TLS certificates may carry a private key provider (Intel QAT, CryptoMB) so that Envoy
signs handshakes with an accelerator; :mod:`identity.handshake_offload` decides per
Envoy, once per stream, and the plain key always travels along (``fallback: true``).
When an Envoy rejects (NACKs) a certificate that carried a provider, that Envoy gets
plain certificates from then on; a rejected plain certificate is handled as before
(logged, counted, not sent again). ``FetchSecrets`` is always plain: a unary fetch has
no NACK to fall back on.

The servicer is the transport edge: it attests the caller once per call, subscribes,
and feeds requests and updates (raced by :mod:`identity.xds_transport`) to the protocol
state in :mod:`identity.xds`, which ECDS (:mod:`identity.ecds`) shares. It picks
every gRPC status (STYLE point 3); the rendering below raises typed errors only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, NoReturn, TypeVar

import grpc
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from identity.bundle import TrustBundle
from identity.errors import (
    AttestationError,
    IdentityError,
    NotEntitledError,
    ValidatorUnavailableError,
    WrongTypeError,
)
from identity.handshake_offload import HandshakeOffload
from identity.key_provider_config import KEY_TYPES, KeyProvider, private_key_provider
from identity.keys import key_type_of
from identity.selectors import Selector
from identity.workload_attestation import CallerAttestor
from identity.workload_cache import Subscription, WorkloadSource, WorkloadSvid, WorkloadUpdate
from identity.xds import (
    SECRET_TYPE_URL,
    DeltaStream,
    OnNack,
    Render,
    SotwStream,
    check_type,
    collection_version,
)
from identity.xds_transport import serve_stream

__all__ = [
    "ALL_BUNDLES",
    "DEFAULT_BUNDLE",
    "DEFAULT_SVID",
    "SPIFFE_VALIDATOR",
    "SdsStats",
    "SecretDiscoveryServicer",
    "add_sds_servicer",
    "render_secrets",
    "spiffe_validation",
]

log = logging.getLogger(__name__)

DEFAULT_SVID = "default"
DEFAULT_BUNDLE = "ROOTCA"
ALL_BUNDLES = "ALL"
SPIFFE_VALIDATOR = "envoy.tls.cert_validator.spiffe"
DISABLE_SPIFFE_KEY = "disable_spiffe_cert_validation"
_SecretRender = Render[WorkloadUpdate, secret_pb2.Secret]
_SecretNack = OnNack[secret_pb2.Secret]

# -- rendering (pure) ---------------------------------------------------------------------


def spiffe_validation(node: base_pb2.Node, *, disabled_by_default: bool = False) -> bool:
    """Whether validation contexts for this Envoy use the SPIFFE validator (SPIRE's rule)."""
    disabled = disabled_by_default
    value = node.metadata.fields.get(DISABLE_SPIFFE_KEY)
    if value is not None:
        override = _parse_bool(value)
        if override is not None:
            disabled = override
    if node.HasField("user_agent_build_version"):
        version = node.user_agent_build_version.version
        if (version.major_number, version.minor_number) < (1, 18):
            return False  # the SPIFFE validator arrived in Envoy 1.18
    return not disabled


def _parse_bool(value: Any) -> bool | None:
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return bool(value.bool_value)
    if kind == "string_value":
        return {
            **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
            **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
        }.get(value.string_value)
    return None


def render_secrets(
    names: Sequence[str],
    update: WorkloadUpdate,
    *,
    spiffe_validator: bool = True,
    key_provider: tuple[KeyProvider, timedelta] | None = None,
) -> dict[str, secret_pb2.Secret]:
    """Resolve SDS resource names for one caller; raise NotEntitledError for the rest.

    With ``key_provider`` (provider, poll delay) each TLS certificate whose key that
    provider signs with carries it, beside the plain key.
    """
    local_id = _td_id(update.bundle)
    bundles: dict[str, TrustBundle] = {local_id: update.bundle}
    for bundle in update.federated.values():
        bundles.setdefault(_td_id(bundle), bundle)
    svids: dict[str, WorkloadSvid] = {}
    for svid in update.svids:
        svids.setdefault(svid.spiffe_id, svid)
    validation = partial(_validation_context, spiffe_validator=spiffe_validator)
    certificate = partial(_tls_certificate, key_provider=key_provider)

    if not names:
        everything = {td_id: validation(td_id, [b]) for td_id, b in sorted(bundles.items())}
        everything.update((sid, certificate(sid, svid)) for sid, svid in svids.items())
        return everything

    out: dict[str, secret_pb2.Secret] = {}
    refused: list[str] = []
    for name in dict.fromkeys(names):
        if name == DEFAULT_SVID and update.svids:
            out[name] = certificate(name, update.svids[0])
        elif name == DEFAULT_BUNDLE:
            out[name] = validation(name, [update.bundle])
        elif name == ALL_BUNDLES:
            if not spiffe_validator:
                raise ValidatorUnavailableError(
                    f"{ALL_BUNDLES!r} needs Envoy's SPIFFE certificate validator, which this "
                    f"Envoy disabled ({DISABLE_SPIFFE_KEY} in its node metadata, or Envoy "
                    f"older than 1.18); ask for {DEFAULT_BUNDLE!r} or one 'spiffe://<td>' each"
                )
            out[name] = validation(name, [bundles[k] for k in sorted(bundles)])
        elif name in bundles:
            out[name] = validation(name, [bundles[name]])
        elif name in svids:
            out[name] = certificate(name, svids[name])
        else:
            refused.append(name)
    if refused:
        raise NotEntitledError(
            refused,
            allowed=f"{DEFAULT_SVID!r}, {DEFAULT_BUNDLE!r}, {ALL_BUNDLES!r}, the SPIFFE IDs of "
            "its entries, or the IDs of known trust domains",
        )
    return out


def _td_id(bundle: TrustBundle) -> str:
    return f"spiffe://{bundle.trust_domain.name}"


def _tls_certificate(
    name: str, svid: WorkloadSvid, *, key_provider: tuple[KeyProvider, timedelta] | None
) -> secret_pb2.Secret:
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
    key = svid.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    certificate = common_pb2.TlsCertificate(
        certificate_chain=base_pb2.DataSource(inline_bytes=chain),
        private_key=base_pb2.DataSource(inline_bytes=key),
    )
    if key_provider is not None:
        provider, poll_delay = key_provider
        # A key the provider cannot sign with would only make Envoy refuse the certificate.
        if key_type_of(svid.key) in KEY_TYPES[provider]:
            certificate.private_key_provider.CopyFrom(
                private_key_provider(provider, key, poll_delay)
            )
    return secret_pb2.Secret(name=name, tls_certificate=certificate)


def _validation_context(
    name: str, bundles: Sequence[TrustBundle], *, spiffe_validator: bool
) -> secret_pb2.Secret:
    if not spiffe_validator:
        (bundle,) = bundles
        context = common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=bundle.pem())
        )
    else:
        config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(
            trust_domains=[
                tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
                    name=b.trust_domain.name,
                    trust_bundle=base_pb2.DataSource(inline_bytes=b.pem()),
                )
                for b in bundles
            ]
        )
        extension = extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR)
        extension.typed_config.Pack(config)
        context = common_pb2.CertificateValidationContext(custom_validator_config=extension)
    return secret_pb2.Secret(name=name, validation_context=context)


# -- the servicer (the edge: attestation, subscription, gRPC status) ---------------------


@dataclass(slots=True)
class SdsStats:
    """Counters for /metrics and tests; updated on the event loop only.

    Key provider fallbacks are counted by :class:`HandshakeOffload` (``fallbacks``).
    """

    streams: int = 0
    responses: int = 0
    nacks: int = 0
    denied: int = 0


_Request = TypeVar("_Request")


class SecretDiscoveryServicer:
    """The three SDS RPCs for grpc.aio; register with :func:`add_sds_servicer`."""

    def __init__(
        self,
        attestor: CallerAttestor,
        source: WorkloadSource,
        *,
        disable_spiffe_cert_validation: bool = False,
        offload: HandshakeOffload | None = None,
    ) -> None:
        self._attestor = attestor
        self._source = source
        self._disable_spiffe = disable_spiffe_cert_validation
        self.offload = offload  # None: plain certificates only
        self.stats = SdsStats()

    async def StreamSecrets(
        self,
        requests: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        async with self._subscription(context) as (subscription, caller):
            streams: list[SotwStream[secret_pb2.Secret, WorkloadUpdate]] = []

            def on_request(
                request: discovery_pb2.DiscoveryRequest, update: WorkloadUpdate
            ) -> discovery_pb2.DiscoveryResponse | None:
                if not streams:  # Envoy sends its node on the first request only
                    render, on_nack = self._stream_render(request.node, caller)
                    streams.append(SotwStream(render, on_nack=on_nack))
                before = streams[0].nacks
                try:
                    return streams[0].on_request(request, update)
                finally:
                    self.stats.nacks += streams[0].nacks - before

            def on_update(update: WorkloadUpdate) -> discovery_pb2.DiscoveryResponse | None:
                return streams[0].on_update(update) if streams else None

            await self._serve(requests, context, subscription, on_request, on_update)

    async def DeltaSecrets(
        self,
        requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        async with self._subscription(context) as (subscription, caller):
            streams: list[DeltaStream[secret_pb2.Secret, WorkloadUpdate]] = []

            def on_request(
                request: discovery_pb2.DeltaDiscoveryRequest, update: WorkloadUpdate
            ) -> discovery_pb2.DeltaDiscoveryResponse | None:
                if not streams:
                    render, on_nack = self._stream_render(request.node, caller)
                    streams.append(DeltaStream(render, on_nack=on_nack))
                before = streams[0].nacks
                try:
                    return streams[0].on_request(request, update)
                finally:
                    self.stats.nacks += streams[0].nacks - before

            def on_update(update: WorkloadUpdate) -> discovery_pb2.DeltaDiscoveryResponse | None:
                return streams[0].on_update(update) if streams else None

            await self._serve(requests, context, subscription, on_request, on_update)

    async def FetchSecrets(
        self,
        request: discovery_pb2.DiscoveryRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> discovery_pb2.DiscoveryResponse:
        async with self._subscription(context) as (subscription, _caller):
            try:
                check_type(request.type_url)
                resources = self._renderer(request.node)(
                    tuple(request.resource_names), subscription.latest
                )
            except IdentityError as exc:
                await self._fail(context, exc)
            self.stats.responses += 1
            response = discovery_pb2.DiscoveryResponse(
                version_info=collection_version(resources), type_url=SECRET_TYPE_URL
            )
            for secret in resources.values():
                response.resources.add().Pack(secret)
            return response

    # -- internals ------------------------------------------------------------------------

    def _renderer(self, node: base_pb2.Node) -> _SecretRender:
        return partial(
            render_secrets,
            spiffe_validator=spiffe_validation(node, disabled_by_default=self._disable_spiffe),
        )

    def _stream_render(
        self, node: base_pb2.Node, caller: str
    ) -> tuple[_SecretRender, _SecretNack | None]:
        """The render of one stream, and what to do when its Envoy rejects a response."""
        if self.offload is None:
            return self._renderer(node), None
        offload = self.offload
        record = offload.envoy(node, caller)
        spiffe_validator = spiffe_validation(node, disabled_by_default=self._disable_spiffe)

        def render(names: Sequence[str], update: WorkloadUpdate) -> dict[str, secret_pb2.Secret]:
            # Read at every render: a rejection on any stream of this Envoy applies here too.
            return render_secrets(
                names, update, spiffe_validator=spiffe_validator, key_provider=record.provider
            )

        def on_nack(rejected: Mapping[str, secret_pb2.Secret], message: str) -> bool:
            if not _carries_provider(rejected):
                return False  # a plain certificate refused: the stream logs it as before
            offload.rejected(record, message)
            return True

        return render, on_nack

    @contextlib.asynccontextmanager
    async def _subscription(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[tuple[Subscription, str]]:
        """The caller's subscription, and the caller's selectors as one string."""
        try:
            selectors = await self._attestor.attest(context.peer())
        except AttestationError as exc:
            self.stats.denied += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"sds: {exc}")
        subscription = self._source.subscribe(selectors)
        try:
            if not subscription.latest.svids:
                self.stats.denied += 1
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    "sds: no registration entry matches this caller "
                    f"(selectors: {', '.join(sorted(map(str, selectors))) or 'none'})",
                )
            self.stats.streams += 1
            yield subscription, _caller(selectors)
        finally:
            subscription.close()

    async def _serve(
        self,
        requests: AsyncIterator[_Request],
        context: grpc.aio.ServicerContext[Any, Any],
        subscription: Subscription,
        on_request: Callable[[_Request, WorkloadUpdate], Any],
        on_update: Callable[[WorkloadUpdate], Any],
    ) -> None:
        def sent() -> None:
            self.stats.responses += 1

        await serve_stream(
            requests,
            context,
            subscription,
            on_request=on_request,
            on_update=on_update,
            fail=partial(self._fail, context),
            sent=sent,
        )

    async def _fail(
        self, context: grpc.aio.ServicerContext[Any, Any], exc: IdentityError
    ) -> NoReturn:
        codes: dict[type[IdentityError], grpc.StatusCode] = {
            NotEntitledError: grpc.StatusCode.PERMISSION_DENIED,
            ValidatorUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
            WrongTypeError: grpc.StatusCode.INVALID_ARGUMENT,
        }
        code = codes.get(type(exc), grpc.StatusCode.INTERNAL)
        if code is grpc.StatusCode.PERMISSION_DENIED:
            self.stats.denied += 1
        log.info("sds: ending the call: %s", exc.message)
        await context.abort(code, f"sds: {exc.message}")


def _carries_provider(secrets: Mapping[str, secret_pb2.Secret]) -> bool:
    return any(
        s.HasField("tls_certificate") and s.tls_certificate.HasField("private_key_provider")
        for s in secrets.values()
    )


def _caller(selectors: frozenset[Selector]) -> str:
    return ",".join(sorted(map(str, selectors)))


def add_sds_servicer(servicer: SecretDiscoveryServicer, server: grpc.aio.Server) -> None:
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(servicer, server)
