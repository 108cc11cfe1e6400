"""Which private key provider, if any, each Envoy's TLS certificates carry.

The agent's setting (``agent.private_key_provider``) applies to every Envoy unless its
node metadata says otherwise, as Istio's per-proxy ProxyConfig does:

- ``meshward.private_key_provider``: ``auto``, ``cryptomb``, ``qat`` or ``none``;
- else Istio's ``PROXY_CONFIG.privateKeyProvider``: ``{cryptomb: {pollDelay: "0.01s"}}``
  or ``{qat: {...}}`` forces that provider (its ``pollDelay`` too, if given; its
  ``fallback`` is not read: meshward always sends ``fallback: true``).

A value neither form understands is ignored, with the reason in the log line.

``auto`` picks QAT, then CryptoMB, for an Envoy when all of these hold: the hardware is
usable on this host (:mod:`identity.accelerators`), the Envoy lists the provider among
its extensions (``node.extensions``, category ``envoy.tls.key_providers``), and the
provider signs with the agent's workload key type. ``cryptomb``/``qat`` force the
provider whatever the detection says, key type aside (Envoy would refuse it for sure).

Whatever was chosen, it never costs a connection: the provider is sent with
``fallback: true`` beside the plain key (:mod:`identity.key_provider_config`), and an
Envoy that rejects such a certificate gets plain ones from then on
(:meth:`HandshakeOffload.rejected`). That is remembered per Envoy (node, build and
attested caller) for the agent's lifetime, so a reconnect does not ask again.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import duration_pb2

from identity.accelerators import Accelerators
from identity.key_provider_config import KEY_TYPES, MIN_POLL_DELAY, KeyProvider
from identity.keys import KeyType

__all__ = [
    "DEFAULT_POLL_DELAYS",
    "KEY_PROVIDER_CATEGORY",
    "METADATA_KEY",
    "EnvoyOffload",
    "HandshakeOffload",
    "OffloadMode",
    "OffloadSettings",
    "ProviderChoice",
    "envoy_key_providers",
]

log = logging.getLogger(__name__)

METADATA_KEY = "meshward.private_key_provider"
KEY_PROVIDER_CATEGORY = "envoy.tls.key_providers"
# CryptoMB: a lone handshake waits up to this long for seven others to share the batch
# with, so it is kept short (Envoy's own code default, 200ms, would add that much to a
# handshake on a quiet sidecar). QAT: how often Envoy polls for finished operations;
# Envoy's default.
DEFAULT_POLL_DELAYS = {
    KeyProvider.CRYPTOMB: timedelta(milliseconds=10),
    KeyProvider.QAT: timedelta(milliseconds=5),
}
_LABELS = {KeyProvider.CRYPTOMB: "CryptoMB", KeyProvider.QAT: "QAT"}
_REMEMBERED = 4096  # Envoys whose choice (and fallback) the agent keeps


class OffloadMode(StrEnum):
    AUTO = "auto"
    CRYPTOMB = "cryptomb"
    QAT = "qat"
    NONE = "none"


@dataclass(slots=True, frozen=True)
class OffloadSettings:
    mode: OffloadMode = OffloadMode.AUTO
    cryptomb_poll_delay: timedelta = DEFAULT_POLL_DELAYS[KeyProvider.CRYPTOMB]
    qat_poll_delay: timedelta = DEFAULT_POLL_DELAYS[KeyProvider.QAT]
    key_type: KeyType = KeyType.EC_P256  # the agent's workload keys

    def __post_init__(self) -> None:
        for provider in KeyProvider:
            if self.poll_delay(provider) < MIN_POLL_DELAY[provider]:
                raise ValueError(
                    f"the {provider} poll delay must be at least {MIN_POLL_DELAY[provider]}"
                )

    def poll_delay(self, provider: KeyProvider) -> timedelta:
        if provider is KeyProvider.CRYPTOMB:
            return self.cryptomb_poll_delay
        return self.qat_poll_delay


@dataclass(slots=True, frozen=True)
class ProviderChoice:
    provider: KeyProvider | None  # None: plain certificates
    poll_delay: timedelta | None
    reason: str


@dataclass(slots=True)
class EnvoyOffload:
    """What one Envoy gets; the SDS servicer reads ``provider`` at every render."""

    envoy: str  # how logs name it
    extensions: frozenset[KeyProvider] | None  # None: the Envoy listed no extensions
    choice: ProviderChoice
    rejection: str | None = None  # Envoy's error when it refused the provider

    @property
    def provider(self) -> tuple[KeyProvider, timedelta] | None:
        if self.rejection is not None or self.choice.provider is None:
            return None
        assert self.choice.poll_delay is not None
        return self.choice.provider, self.choice.poll_delay

    def as_json(self) -> dict[str, Any]:
        current = self.provider
        return {
            "envoy": self.envoy,
            "key_provider": current[0].value if current else None,
            "extensions": None if self.extensions is None else sorted(self.extensions),
            "reason": self.choice.reason,
            **({"rejected": self.rejection} if self.rejection is not None else {}),
        }


def envoy_key_providers(node: base_pb2.Node) -> frozenset[KeyProvider] | None:
    """The key providers this Envoy was built with; None if it lists no extensions at all."""
    if not node.extensions:
        return None
    known = {p.value: p for p in KeyProvider}
    found = set()
    for extension in node.extensions:
        if extension.category != KEY_PROVIDER_CATEGORY or extension.disabled:
            continue
        # Factories register as "cryptomb"; the qualified name is accepted too.
        name = extension.name.removeprefix(KEY_PROVIDER_CATEGORY + ".")
        if name in known:
            found.add(known[name])
    return frozenset(found)


def describe_node(node: base_pb2.Node) -> str:
    version = node.user_agent_build_version.version
    build = (
        f"{version.major_number}.{version.minor_number}.{version.patch}"
        if node.HasField("user_agent_build_version")
        else node.user_agent_version or "unknown version"
    )
    return f"envoy {node.id or '(no node id)'} ({node.cluster or 'no cluster'}, {build})"


class HandshakeOffload:
    """The agent's offload policy, its host's accelerators, and what each Envoy got."""

    def __init__(self, settings: OffloadSettings, host: Accelerators) -> None:
        self.settings = settings
        self.host = host
        self.fallbacks: collections.Counter[KeyProvider] = collections.Counter()
        self._envoys: collections.OrderedDict[tuple[str, ...], EnvoyOffload] = (
            collections.OrderedDict()
        )

    def envoy(self, node: base_pb2.Node, caller: str) -> EnvoyOffload:
        """This Envoy's record; the first time, choose and log the choice (once per Envoy)."""
        key = (caller, node.id, node.cluster, describe_node(node))
        record = self._envoys.get(key)
        if record is not None:
            self._envoys.move_to_end(key)
            return record
        record = EnvoyOffload(
            envoy=describe_node(node),
            extensions=envoy_key_providers(node),
            choice=self.choose(node),
        )
        self._envoys[key] = record
        while len(self._envoys) > _REMEMBERED:
            self._envoys.popitem(last=False)
        choice = record.choice
        if choice.provider is not None:
            log.info(
                "sds: %s: TLS certificates with private key provider %s (poll delay %s, "
                "fallback to software on): %s",
                record.envoy,
                choice.provider,
                _ms(choice.poll_delay),
                choice.reason,
            )
        else:
            # Offload switched off is what the operator asked for: not worth a line per Envoy.
            level = logging.DEBUG if self._mode(node)[0] is OffloadMode.NONE else logging.INFO
            log.log(level, "sds: %s: plain TLS certificates: %s", record.envoy, choice.reason)
        return record

    def rejected(self, record: EnvoyOffload, message: str) -> None:
        """The Envoy refused a certificate carrying the provider: plain ones from now on."""
        current = record.provider
        if current is None:
            return
        record.rejection = message or "no reason given"
        self.fallbacks[current[0]] += 1
        log.warning(
            "sds: %s rejected its TLS certificate with private key provider %s (%s); "
            "sending it plain certificates from now on",
            record.envoy,
            current[0],
            record.rejection,
        )

    def choose(self, node: base_pb2.Node) -> ProviderChoice:
        mode, source, delay, note = self._mode(node)
        note = f" ({note})" if note else ""
        if mode is OffloadMode.NONE:
            return ProviderChoice(None, None, f"{source} is none{note}")
        key_type = self.settings.key_type
        if mode is not OffloadMode.AUTO:
            provider = KeyProvider(mode.value)
            if key_type not in KEY_TYPES[provider]:
                return ProviderChoice(
                    None,
                    None,
                    f"{source} asks for {provider}, which cannot sign with {key_type} keys "
                    f"(agent.workload_key_type){note}",
                )
            return ProviderChoice(
                provider,
                delay or self.settings.poll_delay(provider),
                f"forced by {source}{note}; detected: {self._detected(provider, node)}",
            )
        extensions = envoy_key_providers(node)
        why_not = []
        for provider in (KeyProvider.QAT, KeyProvider.CRYPTOMB):
            problems = self._problems(provider, extensions)
            if not problems:
                return ProviderChoice(
                    provider,
                    self.settings.poll_delay(provider),
                    f"{source} is auto: {self._detected(provider, node)}{note}",
                )
            why_not.append(f"{_LABELS[provider]} not used ({'; '.join(problems)})")
        return ProviderChoice(None, None, f"{source} is auto; " + ", ".join(why_not) + note)

    def as_json(self) -> dict[str, Any]:
        """For the agent's /ready: the setting, the host, and each Envoy seen."""
        return {
            "private_key_provider": self.settings.mode.value,
            "poll_delay": {p.value: _ms(self.settings.poll_delay(p)) for p in KeyProvider},
            "workload_key_type": self.settings.key_type.value,
            **self.host.as_json(),
            "fallbacks": {p.value: self.fallbacks[p] for p in KeyProvider},
            "envoys": [r.as_json() for r in list(self._envoys.values())],
        }

    def envoys_by_provider(self) -> dict[str, int]:
        counts = {p.value: 0 for p in KeyProvider} | {"none": 0}
        for record in list(self._envoys.values()):
            current = record.provider
            counts[current[0].value if current else "none"] += 1
        return counts

    # -- internals ------------------------------------------------------------------------

    def _mode(self, node: base_pb2.Node) -> tuple[OffloadMode, str, timedelta | None, str]:
        """(mode, where it came from, a poll delay the node asked for, a note on bad input)."""
        configured = (self.settings.mode, "agent.private_key_provider", None)
        fields = node.metadata.fields
        value = fields.get(METADATA_KEY)
        if value is not None:
            text = str(value.string_value) if value.WhichOneof("kind") == "string_value" else ""
            try:
                return OffloadMode(text), f"node metadata {METADATA_KEY}", None, ""
            except ValueError:
                return (
                    *configured,
                    f"node metadata {METADATA_KEY} ignored: {_shown(value)} is not one of "
                    "auto, cryptomb, qat, none",
                )
        proxy_config = fields.get("PROXY_CONFIG")
        if proxy_config is not None and proxy_config.WhichOneof("kind") == "struct_value":
            provider = proxy_config.struct_value.fields.get("privateKeyProvider")
            if provider is not None:
                try:
                    mode, delay = _istio_provider(provider)
                except ValueError as exc:
                    return (
                        *configured,
                        f"node metadata PROXY_CONFIG.privateKeyProvider ignored: {exc}",
                    )
                return mode, "node metadata PROXY_CONFIG.privateKeyProvider", delay, ""
        return (*configured, "")

    def _problems(
        self, provider: KeyProvider, extensions: frozenset[KeyProvider] | None
    ) -> list[str]:
        problems = []
        support = self.host.qat if provider is KeyProvider.QAT else self.host.cryptomb
        if not support.usable:
            problems.append(support.reason)
        if extensions is None:
            problems.append("this Envoy lists no extensions (node.extensions)")
        elif provider not in extensions:
            problems.append(f"this Envoy has no {KEY_PROVIDER_CATEGORY}.{provider} extension")
        if self.settings.key_type not in KEY_TYPES[provider]:
            problems.append(f"{_LABELS[provider]} cannot sign with {self.settings.key_type} keys")
        return problems

    def _detected(self, provider: KeyProvider, node: base_pb2.Node) -> str:
        support = self.host.qat if provider is KeyProvider.QAT else self.host.cryptomb
        extensions = envoy_key_providers(node)
        listed = (
            "the Envoy lists no extensions"
            if extensions is None
            else f"the Envoy {'has' if provider in extensions else 'lacks'} the {provider} extension"
        )
        return f"{_LABELS[provider]} {'usable' if support.usable else 'not usable'} ({support.reason}), {listed}"


def _istio_provider(value: Any) -> tuple[OffloadMode, timedelta | None]:
    """Istio's ``privateKeyProvider`` oneof: ``{cryptomb: {...}}`` or ``{qat: {...}}``."""
    if value.WhichOneof("kind") != "struct_value" or len(value.struct_value.fields) != 1:
        raise ValueError(f"{_shown(value)} is not {{cryptomb: {{...}}}} or {{qat: {{...}}}}")
    ((name, options),) = value.struct_value.fields.items()
    if name not in (KeyProvider.CRYPTOMB.value, KeyProvider.QAT.value):
        raise ValueError(f"{name!r} is not cryptomb or qat")
    provider = KeyProvider(name)
    delay = None
    if options.WhichOneof("kind") == "struct_value":
        poll = options.struct_value.fields.get("pollDelay")
        if poll is not None:
            if poll.WhichOneof("kind") != "string_value":
                raise ValueError("pollDelay must be a duration string such as 0.010s")
            parsed = duration_pb2.Duration()
            try:
                parsed.FromJsonString(poll.string_value)
            except ValueError:
                raise ValueError(
                    f"pollDelay {poll.string_value!r} is not a duration such as 0.010s"
                ) from None
            delay = parsed.ToTimedelta()
            if delay < MIN_POLL_DELAY[provider]:
                raise ValueError(f"pollDelay must be at least {MIN_POLL_DELAY[provider]}")
    return OffloadMode(provider.value), delay


def _shown(value: Any) -> str:
    kind = value.WhichOneof("kind")
    shown = (
        repr(getattr(value, kind))
        if kind in ("string_value", "bool_value", "number_value")
        else kind
    )
    return str(shown)[:80]


def _ms(delay: timedelta | None) -> str:
    if delay is None:
        return "-"
    return f"{delay.total_seconds() * 1000:g}ms"
