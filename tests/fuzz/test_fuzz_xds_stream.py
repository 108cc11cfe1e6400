"""The xDS state of the world protocol (identity.xds.SotwStream) under random requests.

Each run is a random sequence of requests (names, nonce current/stale/empty, ACK or NACK,
any version_info, any type URL) and updates. What must hold throughout: a request for
another type is refused with WrongTypeError and nothing else raises; every response
carries a fresh nonce and the version of what it holds; no response repeats the
version the client has or last rejected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import strategies as st

from identity.errors import WrongTypeError
from identity.xds import SECRETS, SotwStream

NAMES = st.lists(st.sampled_from(["default", "ROOTCA", "spiffe://example.org/x", ""]), max_size=3)
CONTENT = st.dictionaries(st.sampled_from(["default", "ROOTCA"]), st.integers(0, 3), max_size=2)
REQUEST = st.fixed_dictionaries(
    {
        "names": NAMES,
        "nonce": st.sampled_from(["current", "stale", "empty"]),
        "nack": st.booleans(),
        "version": st.one_of(st.just(""), st.text(max_size=8)),
        "type_url": st.sampled_from([SECRETS.type_url, SECRETS.type_url, "", "type.x/other"]),
    }
)
ACTIONS = st.lists(st.one_of(REQUEST, CONTENT), min_size=1, max_size=25)


def render(names: Sequence[str], content: Mapping[str, int]) -> dict[str, secret_pb2.Secret]:
    out = {}
    for name in names:
        if name in content:
            secret = secret_pb2.Secret(name=name)
            secret.generic_secret.secret.inline_string = str(content[name])
            out[name] = secret
    return out


@given(ACTIONS)
def test_sotw_stream(actions: list[Any]) -> None:
    stream: SotwStream[secret_pb2.Secret, Mapping[str, int]] = SotwStream(render)
    content: Mapping[str, int] = {}
    nonces: set[str] = set()
    last_nonce = ""
    holds: str | None = None  # the version the client has (or last refused)
    for action in actions:
        if "names" not in action:
            content = action
            response = stream.on_update(content)
        else:
            request = discovery_pb2.DiscoveryRequest(
                resource_names=action["names"],
                version_info=action["version"],
                type_url=action["type_url"],
                response_nonce={"current": last_nonce, "stale": "0", "empty": ""}[action["nonce"]],
            )
            if action["nack"]:
                request.error_detail.CopyFrom(status_pb2.Status(code=3, message="no"))
            if action["type_url"] not in ("", SECRETS.type_url):
                try:
                    stream.on_request(request, content)
                except WrongTypeError:
                    continue
                raise AssertionError("a request for another type was served")
            response = stream.on_request(request, content)
        if response is None:
            continue
        assert response.nonce not in nonces
        nonces.add(response.nonce)
        last_nonce = response.nonce
        resources = {}
        for packed in response.resources:
            secret = secret_pb2.Secret()
            assert packed.Unpack(secret)
            resources[secret.name] = secret
        assert response.version_info == SECRETS.collection_version(resources)
        assert response.version_info != holds
        holds = response.version_info
