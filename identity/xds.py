"""xDS protocol state, one object per stream, no I/O: for any resource type.

The servicers (SDS in :mod:`identity.sds`, ECDS in :mod:`identity.ecds`) own the
transport (gRPC streams, attestation, subscriptions); this module owns what the xDS
protocol says about *when* to send *what*, for the state of the world
(:class:`SotwStream`) and the incremental (:class:`DeltaStream`) variants. It depends on
three things only: a :class:`ResourceKind` (the type URL, how a resource's version is
computed, the name its log lines carry), the caller's latest update, and a pure
:data:`Render` function that resolves requested names against that update.

Versions are content digests, not counters. A version names exactly what the requested
names resolved to (for secrets, private keys excluded from the digest: the certificate
already pins its key), so it means the same thing on every stream and across agent
restarts. That is what makes "no push storm on reconnect" safe: when a reconnecting
Envoy's first request carries the version of exactly the content we would send, it
already has it and nothing is sent; any difference (rotation or a policy change while it
was away, other names, other node options) gives another digest and is pushed at once.
go-control-plane's snapshot cache answers a first request the same way (no response
while the request's version equals the snapshot's); SPIRE instead numbers versions per
stream and resends the state once.

ACK and NACK (xDS protocol, "ACK/NACK and resource type instance version"): a request
whose ``response_nonce`` is our last nonce acknowledges that response; with
``error_detail`` set it rejects it. A rejected version is logged and counted and not sent
again in reply: only content that differs from it is pushed, and the client keeps what it
had. (Once other content has been sent, a later change back to the rejected content is
sent again; the fuzz target in tests/fuzz/test_fuzz_xds_stream.py found the earlier
wording here claimed more.) A state of the world request with an older nonce is stale and
ignored (the client will answer the newer response); a delta request with an older nonce
still carries subscription changes, so only its ACK/NACK meaning is dropped. Each stream
keeps ``acked`` (the version the client last accepted) and ``rejected`` (the last
rejection, until a later response is accepted) for the servicer's reports.

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
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from identity.errors import WrongTypeError
from identity.key_provider_config import redact_private_key

__all__ = [
    "SECRETS",
    "SECRET_TYPE_URL",
    "WILDCARD",
    "DeltaStream",
    "OnNack",
    "Rejection",
    "Render",
    "ResourceKind",
    "SotwStream",
    "check_type",
    "collection_version",
    "resource_version",
]

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105 - a type name
WILDCARD = "*"

R = TypeVar("R", bound=Message)  # the resource message
U = TypeVar("U")  # what the render reads: the caller's latest update

# Resolve the requested names (empty: everything the caller may see) against one update.
# Raises an IdentityError when a name cannot be served; the servicer maps it to a status.
Render = Callable[[Sequence[str], U], Mapping[str, R]]
# Told what a rejected response held and the client's error message; True: handled.
OnNack = Callable[[Mapping[str, R], str], bool]


@dataclass(slots=True, frozen=True)
class ResourceKind(Generic[R]):
    """One xDS resource type as a stream serves it."""

    type_url: str
    label: str  # what log lines start with: "sds", "ecds"
    version: Callable[[R], str]  # a digest of one resource's content

    def collection_version(self, resources: Mapping[str, R]) -> str:
        """A digest of a whole response: names and the versions of what they resolved to."""
        digest = hashlib.sha256(f"meshward-{self.label}-collection\0".encode())
        for name in sorted(resources):
            digest.update(f"{name}\0{self.version(resources[name])}\0".encode())
        return digest.hexdigest()[:16]

    def check_type(self, type_url: str) -> None:
        if type_url and type_url != self.type_url:
            raise WrongTypeError(f"this service serves {self.type_url}, not {type_url}")


@dataclass(slots=True, frozen=True)
class Rejection:
    """A response the client refused: the version it held and the client's message."""

    version: str | None
    message: str


def resource_version(secret: secret_pb2.Secret) -> str:
    """A digest of one secret, without its private key (the certificate pins the key)."""
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


SECRETS: ResourceKind[secret_pb2.Secret] = ResourceKind(SECRET_TYPE_URL, "sds", resource_version)


def collection_version(resources: Mapping[str, secret_pb2.Secret]) -> str:
    """A digest of a whole SDS response (see :meth:`ResourceKind.collection_version`)."""
    return SECRETS.collection_version(resources)


def check_type(type_url: str) -> None:
    SECRETS.check_type(type_url)


def _nonces() -> Iterator[str]:
    # Nonces only need to be unique within a stream.
    return (str(n) for n in itertools.count(1))


def _pack(resource: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(resource)
    return packed


class SotwStream(Generic[R, U]):
    """One state of the world stream: decides which request or update produces a response.

    ``kind`` defaults to secrets, the type this class first served.
    """

    def __init__(
        self,
        render: Render[U, R],
        *,
        on_nack: OnNack[R] | None = None,
        kind: ResourceKind[Any] = SECRETS,
    ) -> None:
        self._render = render
        self._on_nack = on_nack
        self._kind = kind
        self._nonces = _nonces()
        self._names: tuple[str, ...] | None = None  # None until the first request
        self._sent: str | None = None  # the version the client has, or was last sent
        self._nonce: str | None = None
        self._last: Mapping[str, R] = {}  # what the last response held
        self.acked: str | None = None
        self.rejected: Rejection | None = None
        self.nacks = 0

    @property
    def names(self) -> tuple[str, ...] | None:
        return self._names

    @property
    def sent(self) -> str | None:
        """The version last sent, or the one the client said it had when it connected."""
        return self._sent

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, update: U
    ) -> discovery_pb2.DiscoveryResponse | None:
        self._kind.check_type(request.type_url)
        label = self._kind.label
        if self._nonce is not None and request.response_nonce not in ("", self._nonce):
            log.debug("%s: ignoring a stale request (nonce %s)", label, request.response_nonce)
            return None
        if self._names is None:
            # A reconnecting client states what it already holds; see the module docstring.
            self._sent = request.version_info or None
            self.acked = self._sent
        elif request.response_nonce == self._nonce:
            if request.HasField("error_detail"):
                self.nacks += 1
                self.rejected = Rejection(self._sent, request.error_detail.message)
                handled = self._on_nack is not None and self._on_nack(
                    self._last, request.error_detail.message
                )
                log.log(
                    logging.DEBUG if handled else logging.WARNING,
                    "%s: client rejected version %s of %s (keeps %s): %s",
                    label,
                    self._sent,
                    list(request.resource_names),
                    request.version_info or "nothing",
                    request.error_detail.message,
                )
            else:
                self.acked = request.version_info
                self.rejected = None
        self._names = tuple(request.resource_names)
        return self._respond(update)

    def on_update(self, update: U) -> discovery_pb2.DiscoveryResponse | None:
        if self._names is None:
            return None  # nothing requested yet
        return self._respond(update)

    def _respond(self, update: U) -> discovery_pb2.DiscoveryResponse | None:
        assert self._names is not None
        resources = self._render(self._names, update)
        version = self._kind.collection_version(resources)
        if version == self._sent:
            return None  # the client has (or has refused) exactly this
        self._sent = version
        self._nonce = next(self._nonces)
        self._last = resources
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[_pack(resource) for resource in resources.values()],
            type_url=self._kind.type_url,
            nonce=self._nonce,
        )


class DeltaStream(Generic[R, U]):
    """One incremental stream: per-resource versions, subscribe/unsubscribe, removals.

    ``kind`` defaults to secrets, the type this class first served.
    """

    def __init__(
        self,
        render: Render[U, R],
        *,
        on_nack: OnNack[R] | None = None,
        kind: ResourceKind[Any] = SECRETS,
    ) -> None:
        self._render = render
        self._on_nack = on_nack
        self._kind = kind
        self._nonces = _nonces()
        self._started = False
        self._wildcard = False
        self._names: dict[str, None] = {}  # explicit subscriptions, in request order
        self._client: dict[str, str] = {}  # name -> version the client has or was sent
        self._nonce: str | None = None
        self._version: str | None = None  # system_version_info of the last response
        self._last: Mapping[str, R] = {}  # what the last response held
        self.acked: str | None = None
        self.rejected: Rejection | None = None
        self.nacks = 0

    @property
    def subscribed(self) -> tuple[str, ...]:
        return ((WILDCARD,) if self._wildcard else ()) + tuple(self._names)

    @property
    def sent(self) -> str | None:
        """The system version of the last response."""
        return self._version

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest, update: U
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        self._kind.check_type(request.type_url)
        acknowledges = bool(request.response_nonce) and request.response_nonce == self._nonce
        if acknowledges and request.HasField("error_detail"):
            self.nacks += 1
            self.rejected = Rejection(self._version, request.error_detail.message)
            handled = self._on_nack is not None and self._on_nack(
                self._last, request.error_detail.message
            )
            log.log(
                logging.DEBUG if handled else logging.WARNING,
                "%s: client rejected delta response %s: %s",
                self._kind.label,
                request.response_nonce,
                request.error_detail.message,
            )
        elif acknowledges:
            self.acked = self._version
            self.rejected = None
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

    def on_update(self, update: U) -> discovery_pb2.DeltaDiscoveryResponse | None:
        if not self._started:
            return None
        return self._respond(update)

    def _respond(self, update: U) -> discovery_pb2.DeltaDiscoveryResponse | None:
        wanted: dict[str, R] = {}
        if self._wildcard:
            wanted.update(self._render((), update))
        if self._names:
            wanted.update(self._render(tuple(self._names), update))
        versions = {name: self._kind.version(resource) for name, resource in wanted.items()}
        changed = [name for name in wanted if self._client.get(name) != versions[name]]
        removed = [name for name in self._client if name not in wanted]
        if not changed and not removed:
            return None
        for name in removed:
            del self._client[name]
        for name in changed:
            self._client[name] = versions[name]
        self._nonce = next(self._nonces)
        self._version = self._kind.collection_version(wanted)
        self._last = {name: wanted[name] for name in changed}
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=self._version,
            resources=[
                discovery_pb2.Resource(
                    name=name, version=versions[name], resource=_pack(wanted[name])
                )
                for name in changed
            ],
            removed_resources=removed,
            type_url=self._kind.type_url,
            nonce=self._nonce,
        )
