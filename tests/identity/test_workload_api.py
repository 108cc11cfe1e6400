"""The Workload API on the agent socket, spoken to by py-spiffe's own client."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import grpc
import pytest
from cryptography.x509.verification import PolicyBuilder, Store
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spiffe import JwtSource, SpiffeId, TrustDomain, WorkloadApiClient, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc
from spiffe.workloadapi.errors import FetchJwtSvidError, FetchX509SvidError, ValidateJwtSvidError

from tests.identity.agent_stack import AgentStack

WEB = "spiffe://example.org/ns/default/sa/web"
ME = f"unix:uid:{os.getuid()}"
TD = TrustDomain("example.org")


@pytest.fixture
def stack(make_ca, clock, db) -> Iterator[AgentStack]:  # type: ignore[no-untyped-def]
    # The agent runs on the wall clock: SVIDs it hands out must be valid for real clients.
    clock.now = datetime.now(UTC)
    s = AgentStack(make_ca(clock), db)
    yield s
    s.close()


@pytest.fixture
def client(stack: AgentStack) -> Iterator[WorkloadApiClient]:
    c = WorkloadApiClient(socket_path=stack.address, default_timeout=10)
    yield c
    c.close()


def wait_for(predicate, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.05)
    raise AssertionError("condition not met before the deadline")


def test_fetch_x509_svid_for_a_registered_workload(
    stack: AgentStack, client: WorkloadApiClient
) -> None:
    stack.register(WEB, ME, dns_names=("web.default.svc",))
    context = wait_for(lambda: _context_or_none(client))
    svid = context.default_svid
    assert str(svid.spiffe_id) == WEB
    bundle = context.x509_bundle_set.get_bundle_for_trust_domain(TD)
    verifier = (
        PolicyBuilder()
        .store(Store(list(bundle.x509_authorities)))
        .time(datetime.now(UTC))
        .build_client_verifier()
    )
    verifier.verify(svid.leaf, svid.cert_chain[1:])
    # The key is the agent's: it matches the leaf and never came from the server.
    assert svid.private_key.public_key().public_numbers() == svid.leaf.public_key().public_numbers()


def _context_or_none(client: WorkloadApiClient):  # type: ignore[no-untyped-def]
    try:
        return client.fetch_x509_context()
    except FetchX509SvidError:
        return None


def test_jwt_svid_fetch_and_validate(stack: AgentStack, client: WorkloadApiClient) -> None:
    stack.register(WEB, ME)
    wait_for(lambda: _context_or_none(client))
    token = client.fetch_jwt_svid({"reviews"})
    assert str(token.spiffe_id) == WEB
    assert token.audience == {"reviews"}
    validated = client.validate_jwt_svid(token.token, "reviews")
    assert str(validated.spiffe_id) == WEB
    with pytest.raises(ValidateJwtSvidError):
        client.validate_jwt_svid(token.token, "ratings")
    bundles = client.fetch_jwt_bundles()
    assert bundles.get_bundle_for_trust_domain(TD) is not None
    x509_bundles = client.fetch_x509_bundles()
    assert x509_bundles.get_bundle_for_trust_domain(TD) is not None


def test_jwt_svid_for_an_identity_the_caller_lacks_is_refused(
    stack: AgentStack, client: WorkloadApiClient
) -> None:
    stack.register(WEB, ME)
    wait_for(lambda: _context_or_none(client))
    with pytest.raises(FetchJwtSvidError, match=r"PERMISSION_DENIED|no identity"):
        client.fetch_jwt_svid({"reviews"}, subject=SpiffeId("spiffe://example.org/other"))


def test_caller_without_a_matching_entry_is_denied(stack: AgentStack) -> None:
    stack.register(WEB, "unix:uid:4242")
    code = _raw_fetch(stack, metadata=(("workload.spiffe.io", "true"),))
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_missing_security_header_is_an_invalid_argument(stack: AgentStack) -> None:
    stack.register(WEB, ME)
    assert _raw_fetch(stack, metadata=()) == grpc.StatusCode.INVALID_ARGUMENT


def test_call_that_bypasses_the_front_is_unauthenticated(stack: AgentStack) -> None:
    stack.register(WEB, ME)
    inner = f"unix:{stack.root / 'private' / 'grpc.sock'}"
    code = _raw_fetch(stack, metadata=(("workload.spiffe.io", "true"),), target=inner)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def _raw_fetch(stack: AgentStack, *, metadata, target: str | None = None):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(target or f"unix:{stack.socket}") as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        try:
            next(
                iter(
                    stub.FetchX509SVID(
                        workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=10
                    )
                )
            )
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_stream_receives_entry_changes_and_rotations_without_reconnecting(
    stack: AgentStack, client: WorkloadApiClient
) -> None:
    stack.register(WEB, ME, x509_svid_ttl=4)
    # As in SPIRE, a caller with no identity yet is refused rather than kept waiting.
    wait_for(lambda: _context_or_none(client))
    seen: list[tuple[str, int]] = []
    errors: list[Exception] = []
    lock = threading.Lock()

    def on_success(context) -> None:  # type: ignore[no-untyped-def]
        with lock:
            seen.extend((str(s.spiffe_id), s.leaf.serial_number) for s in context.x509_svids)

    handler = client.stream_x509_contexts(on_success, errors.append, retry_connect=False)
    try:
        wait_for(lambda: seen)
        # An entry added while the stream is open reaches it within the sync interval.
        stack.register("spiffe://example.org/ns/default/sa/api", ME)
        wait_for(lambda: any(i == "spiffe://example.org/ns/default/sa/api" for i, _ in seen))
        # A 4 s SVID is re-signed at about 2 s: new serials arrive on the same stream.
        wait_for(lambda: len({s for i, s in seen if i == WEB}) >= 3, timeout=15)
    finally:
        handler.cancel()
    assert errors == []


def test_stream_subscription_is_released_when_the_client_leaves(stack: AgentStack) -> None:
    stack.register(WEB, ME)
    client = WorkloadApiClient(socket_path=stack.address, default_timeout=10)
    wait_for(lambda: _context_or_none(client))
    handler = client.stream_x509_contexts(lambda _c: None, lambda _e: None, retry_connect=False)
    wait_for(lambda: stack.call(lambda: stack.cache.subscribers) >= 1)
    handler.cancel()
    client.close()
    wait_for(lambda: stack.call(lambda: stack.cache.subscribers) == 0)


def test_health_service_reports_serving(stack: AgentStack) -> None:
    with grpc.insecure_channel(f"unix:{stack.socket}") as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="SpiffeWorkloadAPI"), timeout=10
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_x509_source_and_jwt_source_follow_rotation(
    stack: AgentStack, client: WorkloadApiClient
) -> None:
    stack.register(WEB, ME, x509_svid_ttl=4)
    wait_for(lambda: _context_or_none(client))
    source = X509Source(socket_path=stack.address, timeout_in_seconds=10)
    jwt_source = JwtSource(socket_path=stack.address, timeout_in_seconds=10)
    try:
        first = source.get_x509_context().default_svid.leaf.serial_number
        assert str(source.get_x509_context().default_svid.spiffe_id) == WEB
        assert source.get_bundle_for_trust_domain(TD) is not None
        # The source's own watch stream delivers the re-signed SVID (4 s TTL: about 2 s).
        wait_for(
            lambda: source.get_x509_context().default_svid.leaf.serial_number != first, timeout=15
        )
        token = jwt_source.fetch_svid({"reviews"})
        assert str(token.spiffe_id) == WEB
        assert jwt_source.get_bundle_for_trust_domain(TD) is not None
    finally:
        source.close()
        jwt_source.close()
