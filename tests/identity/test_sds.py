"""The SDS servicer on a real grpc.aio server behind PeerFront, called with the xds-protos stubs."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import struct_pb2
from spiffe import SpiffeId, TrustDomain

from identity.authority import CertificateAuthority
from identity.bundle import TrustBundle
from identity.entries import Entry
from identity.errors import AttestationError, NotEntitledError
from identity.peer_front import PeerFront
from identity.sds import (
    SPIFFE_VALIDATOR,
    SecretDiscoveryServicer,
    add_sds_servicer,
    render_secrets,
    spiffe_validation,
)
from identity.selectors import Selector
from identity.workload_cache import WorkloadCache, WorkloadSvid
from identity.xds import SECRET_TYPE_URL
from tests.conftest import FakeClock
from tests.identity.certs import issue_svid
from tests.identity.xds_call import XdsCall

WEB = "spiffe://example.org/ns/default/sa/web"
DB = "spiffe://example.org/ns/default/sa/db"
DEADLINE = 20.0  # only keeps a broken run from hanging
T = TypeVar("T")


class UidAttestor:
    """Test CallerAttestor: the caller's uid (from the peer front) becomes ``unix:uid:<uid>``."""

    def __init__(self, front: PeerFront) -> None:
        self._front = front

    async def attest(self, grpc_peer: str) -> frozenset[Selector]:
        peer = self._front.lookup(grpc_peer)
        if peer is None:
            raise AttestationError("the call did not come through the agent socket")
        return frozenset({Selector("unix", "uid", str(peer.uid))})


def entry(entry_id: str, spiffe_id: str, uid: int, created: int) -> Entry:
    at = datetime(2026, 1, 1, 0, 0, created, tzinfo=UTC)
    return Entry(
        id=entry_id,
        spiffe_id=spiffe_id,
        parent_id="spiffe://example.org/agent",
        selectors=(Selector("unix", "uid", str(uid)),),
        x509_svid_ttl=None,
        jwt_svid_ttl=None,
        dns_names=(),
        hint="",
        admin=False,
        expires_at=None,
        revision=1,
        created_at=at,
        updated_at=at,
    )


def sign(ca: CertificateAuthority, clock: FakeClock, entry_id: str, spiffe_id: str) -> WorkloadSvid:
    issue, key = issue_svid(ca, clock(), spiffe_id=SpiffeId(spiffe_id))
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return WorkloadSvid(entry_id=entry_id, spiffe_id=spiffe_id, chain=issue.chain, key=key, hint="")


class Agent:
    """The SDS half of the agent: grpc.aio server + PeerFront on an event loop in a thread."""

    def __init__(self, root: Path, bundle: TrustBundle) -> None:
        private = root / "private"
        private.mkdir(mode=0o700)
        self.inner = private / "grpc.sock"
        self.listen = root / "agent.sock"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.front = PeerFront(listen=self.listen, upstream=self.inner, tag_dir=private / "peers")
        self.cache = self.run(self._make_cache, bundle)
        self.svids: dict[str, WorkloadSvid] = {}
        self.servicer = SecretDiscoveryServicer(UidAttestor(self.front), self.cache)
        self.server: grpc.aio.Server = self.call(self._start())

    @staticmethod
    def _make_cache(bundle: TrustBundle) -> WorkloadCache:
        return WorkloadCache(bundle)

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        add_sds_servicer(self.servicer, server)
        server.add_insecure_port(f"unix:{self.inner}")
        await server.start()
        await self.front.start()
        return server

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the agent's loop (the cache and its subscriptions live there)."""

        async def inner() -> T:
            return fn(*args, **kwargs)

        return self.call(inner())  # type: ignore[no-any-return]

    def update(self, **kwargs: Any) -> None:
        self.run(self.cache.update, **kwargs)

    def rotate(self, svid: WorkloadSvid) -> None:
        self.svids[svid.entry_id] = svid
        self.update(svids=self.svids)

    def close(self) -> None:
        self.call(self.front.close())
        self.call(self.server.stop(None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


class Call(XdsCall):
    def __init__(self, channel: grpc.Channel, method: str = "StreamSecrets") -> None:
        super().__init__(
            getattr(sds_pb2_grpc.SecretDiscoveryServiceStub(channel), method), timeout=DEADLINE
        )


@pytest.fixture
def agent(make_ca: Any, clock: FakeClock) -> Iterator[tuple[Agent, CertificateAuthority]]:
    # Not tmp_path: the agent socket must be reachable by workloads running as other users.
    root = Path(tempfile.mkdtemp(prefix="meshward-sds-"))
    root.chmod(0o755)
    ca = make_ca(clock)
    a = Agent(root, ca.bundle)
    uid = os.getuid()
    a.svids = {
        "e-web": sign(ca, clock, "e-web", WEB),
        "e-db": sign(ca, clock, "e-db", DB),
        "e-x": sign(ca, clock, "e-x", DB),
    }
    a.update(
        entries=[
            entry("e-web", WEB, uid, 1),
            entry("e-db", DB, uid, 2),
            entry("e-x", DB, uid + 1, 3),
        ],
        svids=a.svids,
    )
    yield a, ca
    a.close()
    shutil.rmtree(root)


@pytest.fixture
def channel(agent: tuple[Agent, CertificateAuthority]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"unix:{agent[0].listen}") as ch:
        yield ch


def request(*names: str, version: str = "", nonce: str = "", node: Any = None) -> Any:
    return discovery_pb2.DiscoveryRequest(
        version_info=version,
        resource_names=list(names),
        type_url=SECRET_TYPE_URL,
        response_nonce=nonce,
        node=node or base_pb2.Node(id="test"),
    )


def secrets(response: Any) -> dict[str, Any]:
    out = {}
    for packed in response.resources:
        s = secret_pb2.Secret()
        assert packed.Unpack(s)
        out[s.name] = s
    return out


def leaf_serial(secret: Any) -> int:
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[
        0
    ].serial_number


def trust_domains(secret: Any) -> dict[str, bytes]:
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    extension = secret.validation_context.custom_validator_config
    assert extension.name == SPIFFE_VALIDATOR
    assert extension.typed_config.Unpack(config)
    return {td.name: td.trust_bundle.inline_bytes for td in config.trust_domains}


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, "condition not reached before the deadline"
        time.sleep(0.02)


# -- over gRPC -----------------------------------------------------------------------------


def test_stream_serves_default_svid_and_root_ca(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    _, ca = agent
    call = Call(channel).send(request("default", "ROOTCA"))
    try:
        got = secrets(call.recv())
    finally:
        call.close()
    assert set(got) == {"default", "ROOTCA"}
    tls = got["default"].tls_certificate
    chain = x509.load_pem_x509_certificates(tls.certificate_chain.inline_bytes)
    assert chain[0].extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
    key = serialization.load_pem_private_key(tls.private_key.inline_bytes, password=None)
    assert tls.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert key.public_key() == chain[0].public_key()
    assert trust_domains(got["ROOTCA"]) == {"example.org": ca.bundle.pem()}


def test_rotation_is_pushed_on_the_open_stream(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel, clock: FakeClock
) -> None:
    a, ca = agent
    call = Call(channel).send(request("default"))
    try:
        first = call.recv()
        call.send(request("default", version=first.version_info, nonce=first.nonce))  # ACK
        # A change this stream cannot see (another caller's SVID) must not produce a push...
        other = sign(ca, clock, "e-x", DB)
        a.rotate(other)
        # ...so the next response is the rotation of its own SVID.
        rotated = sign(ca, clock, "e-web", WEB)
        a.rotate(rotated)
        second = call.recv()
        assert leaf_serial(secrets(second)["default"]) == rotated.leaf.serial_number
        assert second.version_info != first.version_info
        assert second.nonce != first.nonce
    finally:
        call.close()


def test_reconnect_with_the_current_version_gets_no_repeat(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel, clock: FakeClock
) -> None:
    a, ca = agent
    call = Call(channel).send(request("default"))
    first = call.recv()
    call.close()
    wait_for(lambda: a.run(lambda: a.cache.subscribers) == 0)
    # Envoy's first request on the new stream carries the version it holds: no repeat...
    again = Call(channel).send(request("default", version=first.version_info))
    try:
        wait_for(lambda: a.run(lambda: a.cache.subscribers) == 1)
        rotated = sign(ca, clock, "e-web", WEB)
        a.rotate(rotated)
        # ...so the first response it gets is the rotation.
        assert leaf_serial(secrets(again.recv())["default"]) == rotated.leaf.serial_number
    finally:
        again.close()


def test_unauthorised_name_fails_the_stream_and_nothing_is_sent(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    call = Call(channel).send(request("default", "spiffe://example.org/ns/default/sa/admin"))
    with pytest.raises(grpc.RpcError) as failure:
        call.recv()  # the first thing received is the error, not a partial response
    call.close()
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://example.org/ns/default/sa/admin" in str(failure.value.details())
    assert agent[0].servicer.stats.responses == 0


def test_caller_that_bypasses_the_front_is_unauthenticated(
    agent: tuple[Agent, CertificateAuthority],
) -> None:
    with grpc.insecure_channel(f"unix:{agent[0].inner}") as ch:
        call = Call(ch).send(request("default"))
        with pytest.raises(grpc.RpcError) as failure:
            call.recv()
        call.close()
    assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_caller_with_no_svid_is_denied(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    a, _ = agent
    a.update(entries=[e for e in a.cache.entries if e.id == "e-x"])  # only another uid's entry
    call = Call(channel).send(request("ROOTCA"))
    with pytest.raises(grpc.RpcError) as failure:
        call.recv()
    call.close()
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"unix:uid:{os.getuid()}" in str(failure.value.details())
    wait_for(lambda: a.run(lambda: a.cache.subscribers) == 0)


def test_subscription_is_released_when_the_client_leaves(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    a, _ = agent
    call = Call(channel).send(request("default"))
    call.recv()
    assert a.run(lambda: a.cache.subscribers) == 1
    call.close()
    wait_for(lambda: a.run(lambda: a.cache.subscribers) == 0)


def test_subscription_is_released_when_the_channel_closes(
    agent: tuple[Agent, CertificateAuthority],
) -> None:
    a, _ = agent
    with grpc.insecure_channel(f"unix:{a.listen}") as ch:
        call = Call(ch).send(request("default"))
        call.recv()
        assert a.run(lambda: a.cache.subscribers) == 1
    wait_for(lambda: a.run(lambda: a.cache.subscribers) == 0)
    call.close()


def test_nack_is_counted_and_not_answered(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel, clock: FakeClock
) -> None:
    a, ca = agent
    call = Call(channel).send(request("default"))
    try:
        first = call.recv()
        nack = request("default", nonce=first.nonce)
        nack.error_detail.message = "rejected for the test"
        call.send(nack)
        wait_for(lambda: a.servicer.stats.nacks == 1)
        rotated = sign(ca, clock, "e-web", WEB)
        a.rotate(rotated)
        # The NACK got no answer: the next response is the rotation.
        assert leaf_serial(secrets(call.recv())["default"]) == rotated.leaf.serial_number
    finally:
        call.close()


def test_fetch_secrets(agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel) -> None:
    a, ca = agent
    federated = TrustBundle(TrustDomain("partner.test"), ca.bundle.x509_authorities, (), 1, 60)
    a.update(federated={"partner.test": federated})
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    response = stub.FetchSecrets(request(DB, "ALL", "spiffe://partner.test"), timeout=DEADLINE)
    got = secrets(response)
    assert list(got) == [DB, "ALL", "spiffe://partner.test"]
    assert leaf_serial(got[DB]) == a.svids["e-db"].leaf.serial_number
    assert list(trust_domains(got["ALL"])) == ["example.org", "partner.test"]
    assert list(trust_domains(got["spiffe://partner.test"])) == ["partner.test"]
    assert response.version_info
    with pytest.raises(grpc.RpcError) as failure:
        stub.FetchSecrets(request("spiffe://other.test"), timeout=DEADLINE)
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_node_metadata_disables_the_spiffe_validator(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel
) -> None:
    _, ca = agent
    node = base_pb2.Node(id="legacy")
    node.metadata.update({"disable_spiffe_cert_validation": True})
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    got = secrets(stub.FetchSecrets(request("ROOTCA", node=node), timeout=DEADLINE))
    context = got["ROOTCA"].validation_context
    assert not context.HasField("custom_validator_config")
    assert context.trusted_ca.inline_bytes == ca.bundle.pem()
    with pytest.raises(grpc.RpcError) as failure:
        stub.FetchSecrets(request("ALL", node=node), timeout=DEADLINE)
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_delta_stream_pushes_only_the_rotated_resource(
    agent: tuple[Agent, CertificateAuthority], channel: grpc.Channel, clock: FakeClock
) -> None:
    a, ca = agent
    call = Call(channel, "DeltaSecrets").send(
        discovery_pb2.DeltaDiscoveryRequest(
            node=base_pb2.Node(id="test"),
            type_url=SECRET_TYPE_URL,
            resource_names_subscribe=["default", "ROOTCA"],
        )
    )
    try:
        first = call.recv()
        assert sorted(r.name for r in first.resources) == ["ROOTCA", "default"]
        call.send(
            discovery_pb2.DeltaDiscoveryRequest(
                type_url=SECRET_TYPE_URL, response_nonce=first.nonce
            )
        )
        rotated = sign(ca, clock, "e-web", WEB)
        a.rotate(rotated)
        second = call.recv()
        assert [r.name for r in second.resources] == ["default"]
        got = secret_pb2.Secret()
        assert second.resources[0].resource.Unpack(got)
        assert leaf_serial(got) == rotated.leaf.serial_number
    finally:
        call.close()
    wait_for(lambda: a.run(lambda: a.cache.subscribers) == 0)


# -- rendering (pure) ----------------------------------------------------------------------


def test_render_names_like_spire(agent: tuple[Agent, CertificateAuthority]) -> None:
    a, _ = agent
    view = a.run(a.cache.view, frozenset({Selector("unix", "uid", str(os.getuid()))}))
    everything = render_secrets((), view)
    assert list(everything) == ["spiffe://example.org", WEB, DB]
    by_name = render_secrets(("default", WEB, DB, "spiffe://example.org"), view)
    assert leaf_serial(by_name["default"]) == leaf_serial(by_name[WEB])
    assert leaf_serial(by_name[DB]) != leaf_serial(by_name[WEB])
    with pytest.raises(NotEntitledError) as refused:
        render_secrets(("ROOTCA", "spiffe://example.org/ns/x", "nope"), view)
    assert refused.value.names == ("nope", "spiffe://example.org/ns/x")


@pytest.mark.parametrize(
    ("metadata", "version", "expected"),
    [
        pytest.param({}, None, True, id="default"),
        pytest.param({"disable_spiffe_cert_validation": True}, None, False, id="bool-true"),
        pytest.param({"disable_spiffe_cert_validation": "true"}, None, False, id="string-true"),
        pytest.param({"disable_spiffe_cert_validation": False}, None, True, id="bool-false"),
        pytest.param({"disable_spiffe_cert_validation": "maybe"}, None, True, id="unparsable"),
        pytest.param({"disable_spiffe_cert_validation": 1.0}, None, True, id="number-ignored"),
        pytest.param({}, (1, 17), False, id="envoy-1.17"),
        pytest.param({}, (1, 40), True, id="envoy-1.40"),
    ],
)
def test_spiffe_validation_choice(
    metadata: dict[str, Any], version: tuple[int, int] | None, expected: bool
) -> None:
    node = base_pb2.Node(metadata=struct_pb2.Struct())
    node.metadata.update(metadata)
    if version is not None:
        node.user_agent_build_version.version.major_number = version[0]
        node.user_agent_build_version.version.minor_number = version[1]
    assert spiffe_validation(node) is expected
