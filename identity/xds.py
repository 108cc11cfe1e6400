"""xDS protocol state for the secret type: one object per stream, no I/O.

The SDS servicer owns the transport (gRPC streams, attestation, the subscription); this
module owns what the xDS protocol says about *when* to send *what*, for the state of
the world (``StreamSecrets``) and the incremental (``DeltaSecrets``) variants. It
depends on two things only: the caller's latest :class:`WorkloadUpdate` and a pure
:data:`Render` function that resolves requested names to ``Secret`` resources.

Versions are content digests, not counters. A version names exactly what the requested
names resolved to (private keys excluded from the digest: the certificate already pins
its key), so it means the same thing on every stream and across agent restarts. That is
what makes "no push storm on reconnect" safe: when a reconnecting Envoy's first request
carries the version of exactly the content we would send, it already has it and nothing
is sent; any difference (rotation while it was away, other names, other node options)
gives another digest and is pushed at once. go-control-plane's snapshot cache answers a
first request the same way (no response while the request's version equals the
snapshot's); SPIRE instead numbers versions per stream and resends the state once.

ACK and NACK (xDS protocol, "ACK/NACK and resource type instance version"): a request
whose ``response_nonce`` is our last nonce acknowledges that response; with
``error_detail`` set it rejects it. A rejected version is logged and counted and never
sent again on that stream: only content that differs from it is pushed. A state of the
world request with an older nonce is stale and ignored (the client will answer the
newer response); a delta request with an older nonce still carries subscription changes,
so only its ACK/NACK meaning is dropped.

A stream may be given an ``on_nack`` hook: it is told what the rejected response held,
before the stream renders again, so the render can change its mind about what to send
(the SDS servicer drops a private key provider an Envoy refused this way). A hook that
returns True has explained the rejection in its own log line; the stream's is then debug.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from identity.errors import WrongTypeError
from identity.key_provider_config import redact_private_key
from identity.workload_cache import WorkloadUpdate

__all__ = [
    "SECRET_TYPE_URL",
    "WILDCARD",
    "DeltaStream",
    "OnNack",
    "Render",
    "SotwStream",
    "check_type",
    "collection_version",
    "resource_version",
]

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 - a type name
WILDCARD = "*"

# Resolve the requested names (empty: everything the caller may see) against one update.
# Raises an IdentityError when a name cannot be served; the servicer maps it to a status.
Render = Callable[[Sequence[str], WorkloadUpdate], Mapping[str, "secret_pb2.Secret"]]
# Told what a rejected response held and the client's error message; True: handled.
OnNack = Callable[[Mapping[str, "secret_pb2.Secret"], str], bool]


def resource_version(secret: secret_pb2.Secret) -> str:
    """A digest of one resource, without its private key (the certificate pins the key)."""
    public = secret_pb2.Secret()
    public.CopyFrom(secret)
    if public.HasField("tls_certificate"):
        public.tls_certificate.ClearField("private_key")
        if public.tls_certificate.HasField("private_key_provider"):
            # The provider (its name, fallback, poll delay) stays part of the version.
            public.tls_certificate.private_key_provider.CopyFrom(
                redact_private_key(public.tls_certificate.private_key_provider)
            )
    digest = hashlib.sha256(b"meshward-sds-resource\0")
    digest.update(public.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def collection_version(resources: Mapping[str, secret_pb2.Secret]) -> str:
    """A digest of a whole response: names and the versions of what they resolved to."""
    digest = hashlib.sha256(b"meshward-sds-collection\0")
    for name in sorted(resources):
        digest.update(f"{name}\0{resource_version(resources[name])}\0".encode())
    return digest.hexdigest()[:16]


def _nonces() -> Iterator[str]:
    # Nonces only need to be unique within a stream.
    return (str(n) for n in itertools.count(1))


def check_type(type_url: str) -> None:
    if type_url and type_url != SECRET_TYPE_URL:
        raise WrongTypeError(f"this service serves {SECRET_TYPE_URL}, not {type_url}")


def _pack(secret: secret_pb2.Secret) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(secret)
    return packed


class SotwStream:
    """One ``StreamSecrets`` stream: decides which request or update produces a response."""

    def __init__(self, render: Render, *, on_nack: OnNack | None = None) -> None:
        self._render = render
        self._on_nack = on_nack
        self._nonces = _nonces()
        self._names: tuple[str, ...] | None = None  # None until the first request
        self._sent: str | None = None  # the version the client has, or was last sent
        self._nonce: str | None = None
        self._last: Mapping[str, secret_pb2.Secret] = {}  # what the last response held
        self.acked: str | None = None
        self.nacks = 0

    @property
    def names(self) -> tuple[str, ...] | None:
        return self._names

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, update: WorkloadUpdate
    ) -> discovery_pb2.DiscoveryResponse | None:
        check_type(request.type_url)
        if self._nonce is not None and request.response_nonce not in ("", self._nonce):
            log.debug("sds: ignoring a stale request (nonce %s)", request.response_nonce)
            return None
        if self._names is None:
            # A reconnecting client states what it already holds; see the module docstring.
            self._sent = request.version_info or None
        elif request.response_nonce == self._nonce:
            if request.HasField("error_detail"):
                self.nacks += 1
                handled = self._on_nack is not None and self._on_nack(
                    self._last, request.error_detail.message
                )
                log.log(
                    logging.DEBUG if handled else logging.WARNING,
                    "sds: client rejected version %s of %s (keeps %s): %s",
                    self._sent,
                    list(request.resource_names),
                    request.version_info or "nothing",
                    request.error_detail.message,
                )
            else:
                self.acked = request.version_info
        self._names = tuple(request.resource_names)
        return self._respond(update)

    def on_update(self, update: WorkloadUpdate) -> discovery_pb2.DiscoveryResponse | None:
        if self._names is None:
            return None  # nothing requested yet
        return self._respond(update)

    def _respond(self, update: WorkloadUpdate) -> discovery_pb2.DiscoveryResponse | None:
        assert self._names is not None
        resources = self._render(self._names, update)
        version = collection_version(resources)
        if version == self._sent:
            return None  # the client has (or has refused) exactly this
        self._sent = version
        self._nonce = next(self._nonces)
        self._last = resources
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[_pack(secret) for secret in resources.values()],
            type_url=SECRET_TYPE_URL,
            nonce=self._nonce,
        )


class DeltaStream:
    """One ``DeltaSecrets`` stream: per-resource versions, subscribe/unsubscribe, removals."""

    def __init__(self, render: Render, *, on_nack: OnNack | None = None) -> None:
        self._render = render
        self._on_nack = on_nack
        self._nonces = _nonces()
        self._started = False
        self._wildcard = False
        self._names: dict[str, None] = {}  # explicit subscriptions, in request order
        self._client: dict[str, str] = {}  # name -> version the client has or was sent
        self._nonce: str | None = None
        self._last: Mapping[str, secret_pb2.Secret] = {}  # what the last response held
        self.nacks = 0

    @property
    def subscribed(self) -> tuple[str, ...]:
        return ((WILDCARD,) if self._wildcard else ()) + tuple(self._names)

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, update: WorkloadUpdate
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        check_type(request.type_url)
        acknowledges = bool(request.response_nonce) and request.response_nonce == self._nonce
        if acknowledges and request.HasField("error_detail"):
            self.nacks += 1
            handled = self._on_nack is not None and self._on_nack(
                self._last, request.error_detail.message
            )
            log.log(
                logging.DEBUG if handled else logging.WARNING,
                "sds: client rejected delta response %s: %s",
                request.response_nonce,
                request.error_detail.message,
            )
        first = not self._started
        if first:
            self._started = True
            self._client = dict(request.initial_resource_versions)
            # A first request that names nothing is a (legacy) wildcard subscription.
            self._wildcard = not request.resource_names_subscribe
        for name in request.resource_names_subscribe:
            if name == WILDCARD:
                self._wildcard = True
                continue
            self._names[name] = None
            if not first:
                # Subscribing again asks for the resource again (the client dropped it).
                self._client.pop(name, None)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                self._wildcard = False
                continue
            self._names.pop(name, None)
            self._client.pop(name, None)  # the client forgets it; no removal is due
        return self._respond(update)

    def on_update(self, update: WorkloadUpdate) -> discovery_pb2.DeltaDiscoveryResponse | None:
        if not self._started:
            return None
        return self._respond(update)

    def _respond(self, update: WorkloadUpdate) -> discovery_pb2.DeltaDiscoveryResponse | None:
        wanted: dict[str, secret_pb2.Secret] = {}
        if self._wildcard:
            wanted.update(self._render((), update))
        if self._names:
            wanted.update(self._render(tuple(self._names), update))
        versions = {name: resource_version(secret) for name, secret in wanted.items()}
        changed = [name for name in wanted if self._client.get(name) != versions[name]]
        removed = [name for name in self._client if name not in wanted]
        if not changed and not removed:
            return None
        for name in removed:
            del self._client[name]
        for name in changed:
            self._client[name] = versions[name]
        self._nonce = next(self._nonces)
        self._last = {name: wanted[name] for name in changed}
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=collection_version(wanted),
            resources=[
                discovery_pb2.Resource(
                    name=name, version=versions[name], resource=_pack(wanted[name])
                )
                for name in changed
            ],
            removed_resources=removed,
            type_url=SECRET_TYPE_URL,
            nonce=self._nonce,
        )
