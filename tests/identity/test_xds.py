"""The xDS protocol state for secrets, driven request by request (no gRPC, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from spiffe import TrustDomain

from identity.bundle import TrustBundle
from identity.errors import InvalidInputError, WrongTypeError
from identity.workload_cache import WorkloadUpdate
from identity.xds import (
    SECRET_TYPE_URL,
    DeltaStream,
    Rejection,
    ResourceKind,
    SotwStream,
    collection_version,
    resource_version,
)

UPDATE = WorkloadUpdate(
    version=1,
    svids=(),
    bundle=TrustBundle(TrustDomain("example.org"), (), (), 1, 60),
    federated={},
)


def secret(name: str, content: str) -> secret_pb2.Secret:
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_string=content)
        ),
    )


@dataclass
class World:
    """What the caller may see: name -> content. The render ignores the update argument."""

    contents: dict[str, str] = field(default_factory=lambda: {"default": "a1", "ROOTCA": "r1"})

    def render(
        self, names: Sequence[str], _update: WorkloadUpdate
    ) -> Mapping[str, secret_pb2.Secret]:
        wanted = names or sorted(self.contents)
        missing = [n for n in wanted if n not in self.contents]
        if missing:
            raise InvalidInputError(f"not entitled to {missing}")
        return {n: secret(n, self.contents[n]) for n in wanted}


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for packed in response.resources:
        s = secret_pb2.Secret()
        assert packed.Unpack(s)
        out.append(s.name)
    return out


def request(
    names: Sequence[str], *, version: str = "", nonce: str = "", error: str | None = None
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        version_info=version,
        resource_names=list(names),
        type_url=SECRET_TYPE_URL,
        response_nonce=nonce,
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


# -- versions ------------------------------------------------------------------------------


def test_version_is_a_digest_of_content_without_the_private_key() -> None:
    def cert(key: bytes, chain: bytes) -> secret_pb2.Secret:
        return secret_pb2.Secret(
            name="default",
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=chain),
                private_key=base_pb2.DataSource(inline_bytes=key),
            ),
        )

    assert resource_version(cert(b"k1", b"c1")) == resource_version(cert(b"k2", b"c1"))
    assert resource_version(cert(b"k1", b"c1")) != resource_version(cert(b"k1", b"c2"))
    one = {"a": secret("a", "x")}
    assert collection_version(one) == collection_version({"a": secret("a", "x")})
    assert collection_version(one) != collection_version({"b": secret("b", "x")})
    assert collection_version(one) != collection_version({"a": secret("a", "y")})


# -- state of the world --------------------------------------------------------------------


def test_first_request_is_answered_with_the_requested_names() -> None:
    stream = SotwStream(World().render)
    response = stream.on_request(request(["default", "ROOTCA"]), UPDATE)
    assert response is not None
    assert names_of(response) == ["default", "ROOTCA"]
    assert response.type_url == SECRET_TYPE_URL
    assert response.nonce
    assert response.version_info == collection_version(
        World().render(["default", "ROOTCA"], UPDATE)
    )


def test_ack_sends_nothing_and_records_the_version() -> None:
    stream = SotwStream(World().render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    assert (
        stream.on_request(
            request(["default"], version=first.version_info, nonce=first.nonce), UPDATE
        )
        is None
    )
    assert stream.acked == first.version_info
    assert stream.nacks == 0


@pytest.mark.parametrize(
    ("change", "pushed"),
    [
        pytest.param({"default": "a2"}, True, id="requested-resource-rotated"),
        pytest.param({"ROOTCA": "r2"}, False, id="other-resource-changed"),
        pytest.param({}, False, id="nothing-changed"),
    ],
)
def test_update_pushes_only_when_the_requested_names_resolve_differently(
    change: dict[str, str], pushed: bool
) -> None:
    world = World()
    stream = SotwStream(world.render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    stream.on_request(request(["default"], version=first.version_info, nonce=first.nonce), UPDATE)
    world.contents.update(change)
    response = stream.on_update(UPDATE)
    assert (response is not None) is pushed
    if response is not None:
        assert response.version_info != first.version_info
        assert response.nonce != first.nonce


def test_update_before_any_request_sends_nothing() -> None:
    assert SotwStream(World().render).on_update(UPDATE) is None


def test_nack_is_counted_and_the_same_version_is_not_resent() -> None:
    world = World()
    stream = SotwStream(world.render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    nack = request(["default"], version="", nonce=first.nonce, error="bad certificate")
    assert stream.on_request(nack, UPDATE) is None
    assert stream.nacks == 1
    assert stream.acked is None
    assert stream.on_update(UPDATE) is None  # still the rejected content
    world.contents["default"] = "a2"
    fixed = stream.on_update(UPDATE)
    assert fixed is not None
    assert fixed.version_info != first.version_info


def test_nack_with_other_names_is_answered_for_the_new_names() -> None:
    stream = SotwStream(World().render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    response = stream.on_request(request(["ROOTCA"], nonce=first.nonce, error="nope"), UPDATE)
    assert response is not None
    assert names_of(response) == ["ROOTCA"]
    assert stream.nacks == 1


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        pytest.param(["default", "ROOTCA"], ["default", "ROOTCA"], id="name-added"),
        pytest.param(["ROOTCA"], ["ROOTCA"], id="name-replaced"),
        pytest.param(["default"], None, id="same-names"),
        pytest.param([], ["ROOTCA", "default"], id="wildcard"),
    ],
)
def test_resource_name_changes_on_the_stream(second: list[str], expected: list[str] | None) -> None:
    stream = SotwStream(World().render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    response = stream.on_request(
        request(second, version=first.version_info, nonce=first.nonce), UPDATE
    )
    assert (names_of(response) if response is not None else None) == expected
    assert stream.names == tuple(second)


def test_stale_nonce_is_ignored() -> None:
    world = World()
    stream = SotwStream(world.render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    world.contents["default"] = "a2"
    second = stream.on_update(UPDATE)
    assert second is not None
    # The client's answer to the first response crosses the second: it must not count.
    stale = request(["ROOTCA"], version=first.version_info, nonce=first.nonce)
    assert stream.on_request(stale, UPDATE) is None
    assert stream.names == ("default",)
    assert stream.acked is None


@pytest.mark.parametrize(
    ("known", "pushed"),
    [
        pytest.param("current", False, id="reconnect-with-current-version"),
        pytest.param("old", True, id="reconnect-with-older-version"),
        pytest.param("", True, id="fresh-client"),
    ],
)
def test_reconnect_sends_only_what_the_client_lacks(known: str, pushed: bool) -> None:
    world = World()
    before = SotwStream(world.render).on_request(request(["default"]), UPDATE)
    assert before is not None
    version = {"current": before.version_info, "old": "0123456789abcdef", "": ""}[known]
    again = SotwStream(world.render)  # a new stream: the client reconnected
    response = again.on_request(request(["default"], version=version), UPDATE)
    assert (response is not None) is pushed
    # Either way, a later rotation reaches it.
    world.contents["default"] = "a2"
    rotated = again.on_update(UPDATE)
    assert rotated is not None
    assert names_of(rotated) == ["default"]


def test_reconnect_with_current_version_but_other_names_is_answered() -> None:
    world = World()
    before = SotwStream(world.render).on_request(request(["default"]), UPDATE)
    assert before is not None
    response = SotwStream(world.render).on_request(
        request(["ROOTCA"], version=before.version_info), UPDATE
    )
    assert response is not None
    assert names_of(response) == ["ROOTCA"]


def test_wrong_type_url_is_refused() -> None:
    req = request(["default"])
    req.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    with pytest.raises(WrongTypeError):
        SotwStream(World().render).on_request(req, UPDATE)


def test_render_errors_propagate_and_nothing_is_sent() -> None:
    stream = SotwStream(World().render)
    with pytest.raises(InvalidInputError):
        stream.on_request(request(["default", "spiffe://example.org/other"]), UPDATE)


# -- delta ---------------------------------------------------------------------------------


def delta(
    subscribe: Sequence[str] = (),
    unsubscribe: Sequence[str] = (),
    *,
    initial: Mapping[str, str] | None = None,
    nonce: str = "",
    error: str | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(
        type_url=SECRET_TYPE_URL,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        initial_resource_versions=dict(initial or {}),
        response_nonce=nonce,
    )
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def delta_names(response: discovery_pb2.DeltaDiscoveryResponse | None) -> list[str] | None:
    return None if response is None else [r.name for r in response.resources]


def test_delta_subscribe_sends_each_resource_with_its_version() -> None:
    world = World()
    stream = DeltaStream(world.render)
    response = stream.on_request(delta(["default", "ROOTCA"]), UPDATE)
    assert response is not None
    assert delta_names(response) == ["default", "ROOTCA"]
    rendered = world.render(["default", "ROOTCA"], UPDATE)
    assert {r.name: r.version for r in response.resources} == {
        n: resource_version(s) for n, s in rendered.items()
    }
    assert list(response.removed_resources) == []
    assert response.nonce


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"default": "a2"}, ["default"], id="one-rotated"),
        pytest.param({"default": "a2", "ROOTCA": "r2"}, ["default", "ROOTCA"], id="both"),
        pytest.param({}, None, id="nothing"),
    ],
)
def test_delta_update_sends_only_changed_resources(
    change: dict[str, str], expected: list[str] | None
) -> None:
    world = World()
    stream = DeltaStream(world.render)
    first = stream.on_request(delta(["default", "ROOTCA"]), UPDATE)
    assert first is not None
    assert stream.on_request(delta(nonce=first.nonce), UPDATE) is None  # ACK
    world.contents.update(change)
    assert delta_names(stream.on_update(UPDATE)) == expected


def test_delta_subscribe_more_then_unsubscribe() -> None:
    world = World()
    stream = DeltaStream(world.render)
    first = stream.on_request(delta(["default"]), UPDATE)
    assert first is not None
    added = stream.on_request(delta(["ROOTCA"], nonce=first.nonce), UPDATE)
    assert delta_names(added) == ["ROOTCA"]
    assert added is not None
    # Unsubscribing needs no answer, and a later change of that resource is not sent.
    assert stream.on_request(delta(unsubscribe=["ROOTCA"], nonce=added.nonce), UPDATE) is None
    assert stream.subscribed == ("default",)
    world.contents["ROOTCA"] = "r2"
    assert stream.on_update(UPDATE) is None


def test_delta_resubscribe_resends() -> None:
    stream = DeltaStream(World().render)
    first = stream.on_request(delta(["default"]), UPDATE)
    assert first is not None
    again = stream.on_request(delta(["default"], nonce=first.nonce), UPDATE)
    assert delta_names(again) == ["default"]


@pytest.mark.parametrize(
    ("initial", "expected"),
    [
        pytest.param("current", None, id="client-has-current"),
        pytest.param("stale", ["default"], id="client-has-older"),
        pytest.param("none", ["default"], id="client-has-nothing"),
    ],
)
def test_delta_initial_resource_versions(initial: str, expected: list[str] | None) -> None:
    world = World()
    current = resource_version(world.render(["default"], UPDATE)["default"])
    versions = {"current": {"default": current}, "stale": {"default": "old"}, "none": {}}[initial]
    stream = DeltaStream(world.render)
    assert delta_names(stream.on_request(delta(["default"], initial=versions), UPDATE)) == expected


def test_delta_initial_version_of_a_resource_that_is_gone_is_removed() -> None:
    stream = DeltaStream(World().render)
    response = stream.on_request(
        delta(["default"], initial={"spiffe://example.org/gone": "v1"}), UPDATE
    )
    assert response is not None
    assert delta_names(response) == ["default"]
    assert list(response.removed_resources) == ["spiffe://example.org/gone"]


def test_delta_wildcard_reports_removed_resources() -> None:
    world = World(contents={"spiffe://example.org": "r1", "spiffe://example.org/web": "w1"})
    stream = DeltaStream(world.render)
    first = stream.on_request(delta(), UPDATE)  # no names on the first request: wildcard
    assert delta_names(first) == ["spiffe://example.org", "spiffe://example.org/web"]
    assert stream.subscribed == ("*",)
    del world.contents["spiffe://example.org/web"]
    response = stream.on_update(UPDATE)
    assert response is not None
    assert delta_names(response) == []
    assert list(response.removed_resources) == ["spiffe://example.org/web"]


def test_delta_nack_is_counted_and_not_resent() -> None:
    world = World()
    stream = DeltaStream(world.render)
    first = stream.on_request(delta(["default"]), UPDATE)
    assert first is not None
    assert stream.on_request(delta(nonce=first.nonce, error="bad key"), UPDATE) is None
    assert stream.nacks == 1
    assert stream.on_update(UPDATE) is None
    world.contents["default"] = "a2"
    assert delta_names(stream.on_update(UPDATE)) == ["default"]


def test_delta_stale_nonce_still_carries_subscriptions() -> None:
    world = World()
    stream = DeltaStream(world.render)
    first = stream.on_request(delta(["default"]), UPDATE)
    assert first is not None
    world.contents["default"] = "a2"
    assert stream.on_update(UPDATE) is not None
    late = stream.on_request(delta(["ROOTCA"], nonce=first.nonce, error="late"), UPDATE)
    assert delta_names(late) == ["ROOTCA"]
    assert stream.nacks == 0  # a NACK of a response that is no longer the latest


# -- any resource type, and what the streams report ------------------------------------------


def test_a_stream_serves_the_kind_it_is_given() -> None:
    kind = ResourceKind(
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "ecds",
        lambda config: config.name,  # a version function of the kind's own
    )

    def render(names: Sequence[str], _update: WorkloadUpdate) -> dict[str, Any]:
        return {n: extension_pb2.TypedExtensionConfig(name=n) for n in names}

    stream = SotwStream(render, kind=kind)
    req = request(["chain"])
    req.type_url = kind.type_url
    response = stream.on_request(req, UPDATE)
    assert response is not None
    assert response.type_url == kind.type_url
    assert response.version_info == kind.collection_version(
        {"chain": render(["chain"], UPDATE)["chain"]}
    )
    with pytest.raises(WrongTypeError, match=r"serves type\.googleapis\.com/envoy\.config\.core"):
        stream.on_request(request(["chain"]), UPDATE)  # a secret request on this stream


def test_sotw_reports_what_the_client_acked_and_rejected() -> None:
    world = World()
    stream = SotwStream(world.render)
    first = stream.on_request(request(["default"]), UPDATE)
    assert first is not None
    stream.on_request(request(["default"], version=first.version_info, nonce=first.nonce), UPDATE)
    assert (stream.acked, stream.rejected) == (first.version_info, None)
    world.contents["default"] = "a2"
    second = stream.on_update(UPDATE)
    assert second is not None
    nack = request(["default"], version=first.version_info, nonce=second.nonce, error="bad")
    stream.on_request(nack, UPDATE)
    assert stream.acked == first.version_info  # what the client keeps
    assert stream.rejected == Rejection(second.version_info, "bad")
    world.contents["default"] = "a3"
    third = stream.on_update(UPDATE)
    assert third is not None
    stream.on_request(request(["default"], version=third.version_info, nonce=third.nonce), UPDATE)
    assert (stream.acked, stream.rejected) == (third.version_info, None)


def test_delta_reports_what_the_client_acked_and_rejected() -> None:
    world = World()
    stream = DeltaStream(world.render)
    first = stream.on_request(delta(["default"]), UPDATE)
    assert first is not None
    stream.on_request(delta(nonce=first.nonce), UPDATE)
    assert (stream.acked, stream.rejected) == (first.system_version_info, None)
    world.contents["default"] = "a2"
    second = stream.on_update(UPDATE)
    assert second is not None
    stream.on_request(delta(nonce=second.nonce, error="bad"), UPDATE)
    assert stream.acked == first.system_version_info
    assert stream.rejected == Rejection(second.system_version_info, "bad")
