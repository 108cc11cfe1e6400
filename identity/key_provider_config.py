"""``PrivateKeyProvider`` messages for Envoy's contrib CryptoMB and QAT key providers.

xds-protos ships ``PrivateKeyProvider`` but not the contrib configs it carries, so their
``Any`` payload is encoded here by hand. Both messages have the same two fields (Envoy's
``contrib/envoy/extensions/private_key_providers/{cryptomb,qat}/v3alpha/*.proto``)::

    config.core.v3.DataSource  private_key = 1;  // PEM, inline_bytes
    google.protobuf.Duration   poll_delay  = 2;  // required; cryptomb > 0, qat >= 1ms

The nested ``DataSource`` and ``Duration`` are encoded by protobuf itself; only the outer
two length-delimited fields are written here.

The ``TlsCertificate`` keeps its plain ``private_key`` beside the provider, and the
provider says ``fallback: true``. Envoy (``TlsCertificateConfigImpl``) drops a provider
whose extension is compiled in but whose hardware is absent only when ``fallback`` is
set, and then needs ``private_key`` to sign with; without it the certificate is refused
("Failed to load incomplete private key"). When the provider is usable it takes
precedence over ``private_key`` (``ContextImpl``), so carrying both costs nothing.
An Envoy without the extension refuses the certificate whatever ``fallback`` says
("Failed to load private key provider: cryptomb"); the SDS servicer handles that NACK.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2
from google.protobuf import any_pb2, duration_pb2

from identity.keys import KeyType

__all__ = [
    "CONFIG_TYPE_URLS",
    "KEY_TYPES",
    "MIN_POLL_DELAY",
    "KeyProvider",
    "encode_method_config",
    "private_key_provider",
    "redact_private_key",
]


class KeyProvider(StrEnum):
    """Envoy's ``provider_name`` of each contrib key provider."""

    CRYPTOMB = "cryptomb"
    QAT = "qat"


CONFIG_TYPE_URLS = {
    KeyProvider.CRYPTOMB: "type.googleapis.com/"
    "envoy.extensions.private_key_providers.cryptomb.v3alpha.CryptoMbPrivateKeyMethodConfig",
    KeyProvider.QAT: "type.googleapis.com/"
    "envoy.extensions.private_key_providers.qat.v3alpha.QatPrivateKeyMethodConfig",
}
# The workload key types each provider signs with (Envoy refuses the others): CryptoMB
# RSA and ECDSA P-256, QAT RSA only.
KEY_TYPES = {
    KeyProvider.CRYPTOMB: frozenset({KeyType.RSA_2048, KeyType.EC_P256}),
    KeyProvider.QAT: frozenset({KeyType.RSA_2048}),
}
# The proto's own bounds on poll_delay.
MIN_POLL_DELAY = {
    KeyProvider.CRYPTOMB: timedelta(microseconds=1),  # > 0; Duration's unit is ns, ours µs
    KeyProvider.QAT: timedelta(milliseconds=1),
}

_PRIVATE_KEY = 1
_POLL_DELAY = 2
_LENGTH_DELIMITED = 2


def encode_method_config(private_key_pem: bytes, poll_delay: timedelta) -> bytes:
    """The serialized ``CryptoMbPrivateKeyMethodConfig`` / ``QatPrivateKeyMethodConfig``."""
    key = base_pb2.DataSource(inline_bytes=private_key_pem).SerializeToString()
    delay = duration_pb2.Duration()
    delay.FromTimedelta(poll_delay)
    return _field(_PRIVATE_KEY, key) + _field(_POLL_DELAY, delay.SerializeToString())


def private_key_provider(
    provider: KeyProvider, private_key_pem: bytes, poll_delay: timedelta
) -> common_pb2.PrivateKeyProvider:
    if poll_delay < MIN_POLL_DELAY[provider]:
        raise ValueError(f"{provider} poll_delay must be at least {MIN_POLL_DELAY[provider]}")
    return common_pb2.PrivateKeyProvider(
        provider_name=provider.value,
        typed_config=any_pb2.Any(
            type_url=CONFIG_TYPE_URLS[provider],
            value=encode_method_config(private_key_pem, poll_delay),
        ),
        fallback=True,
    )


def redact_private_key(provider: common_pb2.PrivateKeyProvider) -> common_pb2.PrivateKeyProvider:
    """A copy without the key inside its config (for content digests); the rest is kept."""
    public = common_pb2.PrivateKeyProvider()
    public.CopyFrom(provider)
    public.typed_config.value = _without_field(provider.typed_config.value, _PRIVATE_KEY)
    return public


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _without_field(message: bytes, number: int) -> bytes:
    """``message`` with every top-level occurrence of field ``number`` left out."""
    out = bytearray()
    pos = 0
    while pos < len(message):
        start = pos
        tag, pos = _read_varint(message, pos)
        wire_type = tag & 7
        if wire_type == 0:
            _, pos = _read_varint(message, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _read_varint(message, pos)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(message):
            raise ValueError("truncated protobuf message")
        if tag >> 3 != number:
            out += message[start:pos]
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated protobuf varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
