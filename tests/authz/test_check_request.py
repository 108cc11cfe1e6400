"""Table tests for CheckRequest → RequestView (the ext_authz input edge)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from authz.check_request import JWT_AUTHN_FILTER, build_view, parse_labels
from authz.errors import BadRequestError


def _request(
    *,
    method: str = "GET",
    path: str = "/",
    host: str = "web.default.svc",
    headers: dict[str, str] | None = None,
    raw_headers: list[tuple[str, bytes]] | None = None,
    source_principal: str = "spiffe://example.org/ns/default/sa/client",
    destination_principal: str = "spiffe://example.org/ns/default/sa/web",
    source_address: str | None = "10.0.0.1",
    destination_address: str | None = "10.0.0.2",
    destination_port: int = 8080,
    extensions: dict[str, str] | None = None,
    sni: str = "",
    metadata: dict[str, dict[str, Any]] | None = None,
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.source.principal = source_principal
    attrs.destination.principal = destination_principal
    if source_address is not None:
        attrs.source.address.socket_address.address = source_address
        attrs.source.address.socket_address.port_value = 40000
    if destination_address is not None:
        attrs.destination.address.socket_address.address = destination_address
        attrs.destination.address.socket_address.port_value = destination_port
    http = attrs.request.http
    if method:
        http.method = method
        http.path = path
        http.host = host
        for name, value in (headers or {}).items():
            http.headers[name] = value
        for name, raw in raw_headers or []:
            http.header_map.headers.add(key=name, raw_value=raw)
    for key, value in (extensions if extensions is not None else {"namespace": "default"}).items():
        attrs.context_extensions[key] = value
    if sni:
        attrs.tls_session.sni = sni
    for name, fields in (metadata or {}).items():
        attrs.metadata_context.filter_metadata[name].update(fields)
    return request


def test_full_http_request() -> None:
    view = build_view(
        _request(
            method="POST",
            path="/api/v1?x=1",
            headers={":path": "/api/v1?x=1", "X-Custom": "A", "user-agent": "curl"},
            extensions={"namespace": "prod", "labels": "app=web,version=v1", "service": "web"},
            sni="web.prod.svc",
        )
    )
    assert view.workload_namespace == "prod"
    assert view.workload_labels == {"app": "web", "version": "v1"}
    assert view.workload_service == "web"
    assert view.source_principal == "example.org/ns/default/sa/client"
    assert view.source_namespace == "default"
    assert view.source_ip == "10.0.0.1"
    assert view.remote_ip == "10.0.0.1"
    assert view.destination_ip == "10.0.0.2"
    assert view.destination_port == 8080
    assert view.is_http is True
    assert view.method == "POST"
    assert view.host == "web.default.svc"
    assert view.path == "/api/v1?x=1"
    assert view.path_without_query == "/api/v1"
    assert view.headers == {":path": "/api/v1?x=1", "x-custom": "A", "user-agent": "curl"}
    assert view.sni == "web.prod.svc"
    assert view.request_auth is None
    assert view.filter_metadata == {}


@pytest.mark.parametrize(
    ("principal", "expected"),
    [
        ("spiffe://example.org/ns/default/sa/web", "example.org/ns/default/sa/web"),
        ("spiffe://td/custom/path", "td/custom/path"),
        ("spiffe://", None),
        ("", None),
        ("web.default.svc", None),
        ("CN=web,O=example", None),
        ("https://example.org/ns/default/sa/web", None),
    ],
    ids=[
        "istio-form",
        "other-spiffe-path",
        "scheme-only",
        "no-mtls",
        "dns-san",
        "subject",
        "https",
    ],
)
def test_source_principal_forms(principal: str, expected: str | None) -> None:
    assert build_view(_request(source_principal=principal)).source_principal == expected


@pytest.mark.parametrize(
    "path",
    [
        "/a%20b/%2F%2e%2e",
        "/caf\u00e9/\u65e5\u672c",
        "/search?q=a&q=b#frag",
        "/?",
        "*",
        "",
    ],
    ids=[
        "percent-encoded-kept-as-is",
        "non-ascii",
        "query-and-fragment",
        "empty-query",
        "options-star",
        "empty",
    ],
)
def test_paths_are_kept_verbatim(path: str) -> None:
    # No decoding or normalisation here: Envoy normalises before ext_authz, and
    # Istio matches the path as Envoy hands it over.
    assert build_view(_request(path=path)).path == path


def test_query_is_stripped_only_for_matching() -> None:
    view = build_view(_request(path="/search?q=%2Fadmin"))
    assert view.path == "/search?q=%2Fadmin"
    assert view.path_without_query == "/search"


@pytest.mark.parametrize("path", ["/a\x00b", "/a\nb", "/a\rb", "/a\x7fb", "/a\tb"])
def test_path_with_control_characters_is_refused(path: str) -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(_request(path=path))
    assert err.value.reason == "invalid_path"


def test_non_utf8_path_cannot_reach_build_view() -> None:
    # protobuf strings are UTF-8 by contract: the parser rejects the message, so
    # the gRPC server fails the call before a view is built (Envoy then applies
    # its failure_mode_allow=false and denies).
    wire = _request(path="/ok").SerializeToString()
    with pytest.raises(DecodeError):
        external_auth_pb2.CheckRequest.FromString(wire.replace(b"/ok", b"/\xffk"))
    with pytest.raises(UnicodeEncodeError):
        _request(path="/\udcff")


@pytest.mark.parametrize(
    ("headers", "raw", "expected"),
    [
        ({"X-A": "1"}, [], {"x-a": "1"}),
        ({}, [("X-Raw", b"v")], {"x-raw": "v"}),
        ({}, [("x-dup", b"1"), ("X-Dup", b"2")], {"x-dup": "1,2"}),
        ({}, [("x-utf8", "\u00e9".encode())], {"x-utf8": "\u00e9"}),
        ({"x-empty": ""}, [], {"x-empty": ""}),
        ({":authority": "h", ":method": "GET"}, [], {":authority": "h", ":method": "GET"}),
    ],
    ids=["map-lowercased", "raw-map", "repeated-joined", "raw-utf8", "empty-value", "pseudo-kept"],
)
def test_headers(
    headers: dict[str, str], raw: list[tuple[str, bytes]], expected: dict[str, str]
) -> None:
    assert build_view(_request(headers=headers, raw_headers=raw)).headers == expected


def test_raw_header_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(_request(raw_headers=[("x-latin1", b"caf\xe9")]))
    assert err.value.reason == "non_utf8_header"
    assert "x-latin1" in err.value.detail


@pytest.mark.parametrize(
    ("headers", "limits", "reason"),
    [
        ({f"h{i}": "v" for i in range(201)}, {}, "too_many_headers"),
        ({f"h{i}": "v" for i in range(10_000)}, {}, "too_many_headers"),
        ({"h1": "v", "h2": "v", "h3": "v"}, {"max_headers": 2}, "too_many_headers"),
        ({"big": "x" * (64 * 1024)}, {}, "headers_too_large"),
        ({"a": "x" * 60}, {"max_header_bytes": 60}, "headers_too_large"),
        ({"a": "\u00e9" * 30}, {"max_header_bytes": 60}, "headers_too_large"),
        ({"": "v"}, {}, "invalid_header_name"),
    ],
    ids=[
        "201-default",
        "huge-map",
        "custom-count",
        "one-huge-value",
        "bytes-over-by-name",
        "bytes-counted-as-utf8",
        "empty-name",
    ],
)
def test_header_limits(headers: dict[str, str], limits: dict[str, int], reason: str) -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(_request(headers=headers), **limits)
    assert err.value.reason == reason
    assert err.value.code == "request_parse_error"


def test_headers_at_the_limits_are_accepted() -> None:
    view = build_view(_request(headers={f"h{i}": "v" for i in range(200)}))
    assert len(view.headers) == 200
    view = build_view(_request(headers={"a": "x" * 59}), max_header_bytes=60)
    assert view.headers == {"a": "x" * 59}


def test_raw_headers_count_against_the_same_limits() -> None:
    raw = [(f"h{i}", b"v") for i in range(3)]
    with pytest.raises(BadRequestError) as err:
        build_view(_request(headers={"a": "1"}, raw_headers=raw), max_headers=3)
    assert err.value.reason == "too_many_headers"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("   ", {}),
        ("app=web", {"app": "web"}),
        ("app=web,version=v1", {"app": "web", "version": "v1"}),
        (" app = web , version=v1 ", {"app": "web", "version": "v1"}),
        ("app.kubernetes.io/name=web", {"app.kubernetes.io/name": "web"}),
        ("flag=", {"flag": ""}),
    ],
)
def test_parse_labels(text: str, expected: dict[str, str]) -> None:
    assert parse_labels(text) == expected


@pytest.mark.parametrize(
    "text",
    ["app", "app=web,", ",app=web", "=web", "app=web,app=api", "a=b=c", "app=web,,v=1"],
    ids=[
        "no-equals",
        "trailing-comma",
        "leading-comma",
        "empty-key",
        "duplicate",
        "two-equals",
        "empty-item",
    ],
)
def test_malformed_labels_are_refused(text: str) -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(_request(extensions={"namespace": "default", "labels": text}))
    assert err.value.reason == "malformed_labels"


@pytest.mark.parametrize(
    ("extensions", "destination_principal", "namespace", "service"),
    [
        ({"namespace": "prod"}, "spiffe://td/ns/other/sa/web", "prod", None),
        ({}, "spiffe://td/ns/other/sa/web", "other", None),
        ({"namespace": ""}, "spiffe://td/ns/other/sa/web", "other", None),
        ({"service": "web"}, "spiffe://td/ns/other/sa/web", "other", "web"),
        ({"namespace": "prod", "service": ""}, "", "prod", None),
    ],
    ids=["extension-wins", "fallback", "empty-extension-falls-back", "service", "empty-service"],
)
def test_workload(
    extensions: dict[str, str], destination_principal: str, namespace: str, service: str | None
) -> None:
    view = build_view(_request(extensions=extensions, destination_principal=destination_principal))
    assert view.workload_namespace == namespace
    assert view.workload_service == service


@pytest.mark.parametrize(
    "destination_principal",
    ["", "web.default.svc", "spiffe://td/sa/web", "spiffe://td/ns//sa/web", "spiffe://td"],
)
def test_no_workload_namespace_fails_closed(destination_principal: str) -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(_request(extensions={}, destination_principal=destination_principal))
    assert err.value.reason == "no_workload_namespace"


def test_tcp_request_has_no_http_attributes() -> None:
    view = build_view(_request(method="", sni="db.prod.svc"))
    assert view.is_http is False
    assert (view.method, view.host, view.path) == (None, None, None)
    assert view.headers == {}
    assert view.source_principal == "example.org/ns/default/sa/client"
    assert view.destination_port == 8080
    assert view.sni == "db.prod.svc"


def test_empty_request_fails_closed() -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(external_auth_pb2.CheckRequest())
    assert err.value.reason == "no_workload_namespace"


def test_pipe_addresses_have_no_ip() -> None:
    request = _request(source_address=None, destination_address=None)
    request.attributes.source.address.pipe.path = "/tmp/sock"
    view = build_view(request)
    assert (view.source_ip, view.remote_ip, view.destination_ip, view.destination_port) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("xff", "hops", "expected"),
    [
        (None, 0, "10.0.0.1"),
        ("203.0.113.9", 0, "10.0.0.1"),
        ("203.0.113.9, 10.0.0.1", 0, "10.0.0.1"),
        ("203.0.113.9, 10.0.0.1", 1, "203.0.113.9"),
        ("spoofed, 203.0.113.9, 10.0.0.1", 1, "203.0.113.9"),
        ("198.51.100.7, 203.0.113.9, 10.0.0.1", 2, "198.51.100.7"),
        ("10.0.0.1", 1, "10.0.0.1"),
        (None, 1, "10.0.0.1"),
        ("2001:db8::1 , 10.0.0.1", 1, "2001:db8::1"),
    ],
    ids=[
        "no-header",
        "untrusted-by-default",
        "untrusted-by-default-2",
        "one-trusted-hop",
        "spoof-left-of-trusted-ignored",
        "two-trusted-hops",
        "too-few-entries-falls-back",
        "no-header-falls-back",
        "ipv6-with-spaces",
    ],
)
def test_remote_ip(xff: str | None, hops: int, expected: str) -> None:
    headers = {"x-forwarded-for": xff} if xff is not None else {}
    view = build_view(_request(headers=headers), xff_num_trusted_hops=hops)
    assert view.remote_ip == expected
    assert view.source_ip == "10.0.0.1"


def test_external_address_header_is_not_trusted() -> None:
    view = build_view(_request(headers={"x-envoy-external-address": "203.0.113.9"}))
    assert view.remote_ip == "10.0.0.1"


def test_trusted_xff_hop_that_is_not_an_ip_is_refused() -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(
            _request(headers={"x-forwarded-for": "not-an-ip, 10.0.0.1"}), xff_num_trusted_hops=1
        )
    assert err.value.reason == "invalid_forwarded_for"


_PAYLOAD = {"iss": "https://issuer.example", "sub": "alice", "aud": ["a", "b"], "n": {"k": 1}}


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (None, None),
        ({JWT_AUTHN_FILTER: {}}, None),
        ({JWT_AUTHN_FILTER: {"https://issuer.example": _PAYLOAD}}, _PAYLOAD),
        ({"envoy.filters.http.other": {"issuer": _PAYLOAD}}, None),
    ],
    ids=["no-metadata", "filter-without-payload", "one-payload", "other-filter"],
)
def test_jwt_payload(metadata: dict[str, dict[str, Any]] | None, expected: Any) -> None:
    view = build_view(_request(metadata=metadata))
    assert view.request_auth == (None if expected is None else {**expected, "n": {"k": 1.0}})
    if expected is not None:
        assert view.request_principal == "https://issuer.example/alice"


def test_authorization_header_is_never_read() -> None:
    token = "eyJhbGciOiJub25lIn0.eyJpc3MiOiJldmlsIiwic3ViIjoieCJ9."
    view = build_view(_request(headers={"authorization": f"Bearer {token}"}))
    assert view.request_auth is None
    assert view.request_principal is None


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ({"iss-a": _PAYLOAD, "iss-b": _PAYLOAD}, "multiple_jwt_payloads"),
        ({"iss-a": "not-a-struct"}, "malformed_jwt_metadata"),
        ({"iss-a": [1, 2]}, "malformed_jwt_metadata"),
    ],
    ids=["multiple", "string", "list"],
)
def test_bad_jwt_metadata_fails_closed(entries: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadRequestError) as err:
        build_view(_request(metadata={JWT_AUTHN_FILTER: entries}))
    assert err.value.reason == reason


def test_filter_metadata_is_converted_to_plain_values() -> None:
    mysql = {"db.table": ["select", "insert"], "nested": {"flag": True, "none": None}}
    view = build_view(
        _request(
            metadata={
                "envoy.filters.network.mysql_proxy": mysql,
                "istio_authn": {"x": "y"},
            }
        )
    )
    assert view.filter_metadata == {"envoy.filters.network.mysql_proxy": mysql}
    converted = view.filter_metadata["envoy.filters.network.mysql_proxy"]
    assert not isinstance(converted["nested"], struct_pb2.Struct)
    assert isinstance(converted["db.table"], list)
