"""The provider-carrying TLS certificate, decoded field by field from the wire.

The contrib configs (CryptoMbPrivateKeyMethodConfig, QatPrivateKeyMethodConfig) are
not in xds-protos, so their bytes are read here with a raw protobuf wire decoder written
for this test, and compared with Envoy's proto definitions:

    // contrib/envoy/extensions/private_key_providers/cryptomb/v3alpha/cryptomb.proto
    // contrib/envoy/extensions/private_key_providers/qat/v3alpha/qat.proto
    config.core.v3.DataSource private_key = 1;   // message: inline_bytes = 2 (bytes)
    google.protobuf.Duration  poll_delay  = 2;   // message: seconds = 1, nanos = 2 (varint)

PrivateKeyProvider and TlsCertificate are checked with xds-protos' real messages and,
independently, on the wire (provider_name = 1, typed_config = 3, fallback = 4;
TlsCertificate.private_key = 2, private_key_provider = 6).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from spiffe import SpiffeId

from identity.key_provider_config import (
    KeyProvider,
    encode_method_config,
    private_key_provider,
    redact_private_key,
)
from identity.keys import KeyType, generate_key
from identity.sds import render_secrets
from identity.workload_cache import WorkloadSvid, WorkloadUpdate
from identity.xds import resource_version
from tests.identity.certs import standalone_ca

VARINT, I64, LEN, I32 = 0, 1, 2, 5
WEB = "spiffe://example.org/ns/default/sa/web"
PEM = b"-----BEGIN PRIVATE KEY-----\nnot a real key\n-----END PRIVATE KEY-----\n"


def fields(data: bytes) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) in order: ints for VARINT/I64/I32, bytes for LEN."""
    out: list[tuple[int, int, Any]] = []
    pos = 0

    def varint() -> int:
        nonlocal pos
        value, shift = 0, 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(data):
        tag = varint()
        number, wire = tag >> 3, tag & 7
        if wire == VARINT:
            out.append((number, wire, varint()))
        elif wire == LEN:
            size = varint()
            out.append((number, wire, data[pos : pos + size]))
            pos += size
        elif wire in (I64, I32):
            size = 8 if wire == I64 else 4
            out.append((number, wire, int.from_bytes(data[pos : pos + size], "little")))
            pos += size
        else:
            raise AssertionError(f"wire type {wire} at byte {pos}")
    assert pos == len(data), "trailing bytes"
    return out


def one(data: bytes, number: int) -> tuple[int, Any]:
    (found,) = [(wire, value) for n, wire, value in fields(data) if n == number]
    return found


# -- the contrib configs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("delay", "seconds", "nanos"),
    [
        pytest.param(timedelta(milliseconds=10), None, 10_000_000, id="10ms"),
        pytest.param(timedelta(milliseconds=5), None, 5_000_000, id="5ms"),
        pytest.param(timedelta(seconds=1, milliseconds=500), 1, 500_000_000, id="1.5s"),
        pytest.param(timedelta(seconds=2), 2, None, id="2s"),
    ],
)
def test_method_config_wire_format(
    delay: timedelta, seconds: int | None, nanos: int | None
) -> None:
    encoded = encode_method_config(PEM, delay)
    assert [(n, w) for n, w, _ in fields(encoded)] == [(1, LEN), (2, LEN)]
    # private_key = 1: a config.core.v3.DataSource with only inline_bytes = 2 set.
    _, data_source = one(encoded, 1)
    assert fields(data_source) == [(2, LEN, PEM)]
    # poll_delay = 2: a google.protobuf.Duration; proto3 leaves zero fields out.
    _, duration = one(encoded, 2)
    expected = [(1, VARINT, seconds)] if seconds else []
    expected += [(2, VARINT, nanos)] if nanos else []
    assert fields(duration) == expected


@pytest.mark.parametrize(
    ("provider", "type_url", "delay"),
    [
        (
            KeyProvider.CRYPTOMB,
            "type.googleapis.com/envoy.extensions.private_key_providers.cryptomb.v3alpha."
            "CryptoMbPrivateKeyMethodConfig",
            timedelta(milliseconds=10),
        ),
        (
            KeyProvider.QAT,
            "type.googleapis.com/envoy.extensions.private_key_providers.qat.v3alpha."
            "QatPrivateKeyMethodConfig",
            timedelta(milliseconds=5),
        ),
    ],
)
def test_private_key_provider_message(
    provider: KeyProvider, type_url: str, delay: timedelta
) -> None:
    message = private_key_provider(provider, PEM, delay)
    # Through xds-protos' own message, after a round trip over the wire...
    parsed = common_pb2.PrivateKeyProvider.FromString(message.SerializeToString())
    assert parsed.provider_name == provider.value
    assert parsed.WhichOneof("config_type") == "typed_config"
    assert parsed.fallback is True
    assert parsed.typed_config.type_url == type_url
    # ...and on the wire itself, against the field numbers of Envoy's tls/v3/common.proto.
    wire = fields(message.SerializeToString())
    assert [(n, w) for n, w, _ in wire] == [(1, LEN), (3, LEN), (4, VARINT)]
    assert one(message.SerializeToString(), 1) == (LEN, provider.value.encode())
    assert one(message.SerializeToString(), 4) == (VARINT, 1)
    _, packed = one(message.SerializeToString(), 3)  # google.protobuf.Any
    assert fields(packed) == [
        (1, LEN, type_url.encode()),
        (2, LEN, encode_method_config(PEM, delay)),
    ]


def test_xds_protos_field_numbers_are_envoys() -> None:
    # If xds-protos ever renumbered, the wire checks above would compare against it.
    provider = {f.name: f.number for f in common_pb2.PrivateKeyProvider.DESCRIPTOR.fields}
    assert provider == {"provider_name": 1, "typed_config": 3, "fallback": 4}
    certificate = {f.name: f.number for f in common_pb2.TlsCertificate.DESCRIPTOR.fields}
    assert certificate["private_key"] == 2
    assert certificate["private_key_provider"] == 6
    data_source = {f.name: f.number for f in base_pb2.DataSource.DESCRIPTOR.fields}
    assert data_source["inline_bytes"] == 2


@pytest.mark.parametrize(
    ("provider", "delay"),
    [
        (KeyProvider.CRYPTOMB, timedelta(0)),
        (KeyProvider.QAT, timedelta(microseconds=999)),
    ],
)
def test_poll_delay_below_the_proto_bounds_is_refused(
    provider: KeyProvider, delay: timedelta
) -> None:
    with pytest.raises(ValueError, match="poll_delay must be at least"):
        private_key_provider(provider, PEM, delay)


# -- in the TLS certificate SDS sends ------------------------------------------------------


def svid_update(key_type: KeyType, tmp_path: Path) -> tuple[WorkloadUpdate, bytes]:
    now = datetime.now(UTC)
    with standalone_ca(tmp_path / "ca", now) as ca:
        key = generate_key(key_type)
        public_key = key.public_key()
        issue = ca.sign_x509_svid(
            public_key=public_key,
            spiffe_id=SpiffeId(WEB),
            ttl=None,
            issued_to="spiffe://example.org/agent/test",
            now=now,
        )
        bundle = ca.bundle
    svid = WorkloadSvid(entry_id="e", spiffe_id=WEB, chain=issue.chain, key=key, hint="")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return WorkloadUpdate(version=1, svids=(svid,), bundle=bundle, federated={}), pem


def test_tls_certificate_carries_the_provider_and_the_plain_key(tmp_path: Path) -> None:
    update, pem = svid_update(KeyType.EC_P256, tmp_path)
    delay = timedelta(milliseconds=10)
    rendered = render_secrets(
        ["default", "ROOTCA"], update, key_provider=(KeyProvider.CRYPTOMB, delay)
    )
    wire = rendered["default"].SerializeToString()
    secret = secret_pb2.Secret.FromString(wire)
    tls = secret.tls_certificate
    assert tls.private_key.inline_bytes == pem  # Envoy signs with it when it falls back
    assert tls.private_key_provider.provider_name == "cryptomb"
    assert tls.private_key_provider.fallback
    # Secret.tls_certificate = 2; in it private_key = 2 and private_key_provider = 6.
    _, certificate = one(wire, 2)
    numbers = [n for n, _, _ in fields(certificate)]
    assert numbers == [1, 2, 6]
    _, provider = one(certificate, 6)
    _, packed = one(provider, 3)
    _, config = one(packed, 2)
    _, data_source = one(config, 1)
    assert fields(data_source) == [(2, LEN, pem)]
    # The validation context is untouched.
    assert not rendered["ROOTCA"].HasField("tls_certificate")


@pytest.mark.parametrize(
    ("provider", "key_type", "carried"),
    [
        (KeyProvider.CRYPTOMB, KeyType.EC_P256, True),
        (KeyProvider.CRYPTOMB, KeyType.RSA_2048, True),
        (KeyProvider.CRYPTOMB, KeyType.EC_P384, False),
        (KeyProvider.QAT, KeyType.RSA_2048, True),
        (KeyProvider.QAT, KeyType.EC_P256, False),
    ],
)
def test_provider_only_for_keys_it_signs_with(
    tmp_path: Path, provider: KeyProvider, key_type: KeyType, carried: bool
) -> None:
    update, pem = svid_update(key_type, tmp_path)
    rendered = render_secrets(
        ["default"], update, key_provider=(provider, timedelta(milliseconds=5))
    )
    tls = rendered["default"].tls_certificate
    assert tls.HasField("private_key_provider") is carried
    assert tls.private_key.inline_bytes == pem


def test_version_follows_the_provider_but_not_the_key(tmp_path: Path) -> None:
    def secret(key: bytes, provider: KeyProvider | None, ms: int = 10) -> secret_pb2.Secret:
        tls = common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=b"chain"),
            private_key=base_pb2.DataSource(inline_bytes=key),
        )
        if provider is not None:
            tls.private_key_provider.CopyFrom(
                private_key_provider(provider, key, timedelta(milliseconds=ms))
            )
        return secret_pb2.Secret(name="default", tls_certificate=tls)

    cryptomb = resource_version(secret(b"k1", KeyProvider.CRYPTOMB))
    assert cryptomb == resource_version(secret(b"k2", KeyProvider.CRYPTOMB))
    assert cryptomb != resource_version(secret(b"k1", None))
    assert cryptomb != resource_version(secret(b"k1", KeyProvider.QAT))
    assert cryptomb != resource_version(secret(b"k1", KeyProvider.CRYPTOMB, ms=20))
    # What the digest is taken over holds no key, but keeps the poll delay.
    redacted = redact_private_key(
        private_key_provider(KeyProvider.CRYPTOMB, PEM, timedelta(milliseconds=10))
    )
    assert PEM not in redacted.SerializeToString()
    assert [n for n, _, _ in fields(redacted.typed_config.value)] == [2]
