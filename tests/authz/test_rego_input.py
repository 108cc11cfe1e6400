"""CheckRequest → OPA-Envoy's Rego ``input``: protobuf JSON form, parsed path/query/body.

The protobuf half is checked against ``json_format.MessageToDict`` with the options that
match ``protojson.Marshal``'s defaults (what OPA-Envoy uses), on hand-picked and on
generated requests. The parsing half is table-tested against what OPA-Envoy's
``envoyauth/request.go`` (getParsedPathAndQuery, getParsedBody) returns for the same
input.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import any_pb2, json_format, struct_pb2, wrappers_pb2

from authz.check_request import build_view
from authz.errors import BadRequestError
from authz.rego_input import VERSION, RegoInput, build_input
from authz.request_view import RequestView

ABSENT = object()  # parsed_body left out of the document (the body did not parse)


def _reference(message: Any) -> dict[str, Any]:
    # protojson.Marshal's defaults: JSON (lowerCamelCase) names, unpopulated fields
    # left out, enums by name.
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=False,
        always_print_fields_with_no_presence=False,
        use_integers_for_enums=False,
    )


def _protobuf_part(document: dict[str, Any]) -> dict[str, Any]:
    added = {"version", "parsed_path", "parsed_query", "parsed_body", "truncated_body"}
    return {key: value for key, value in document.items() if key not in added}


def _request(
    *,
    method: str = "POST",
    path: str = "/",
    headers: dict[str, str] | None = None,
    body: str = "",
    raw_body: bytes = b"",
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.destination.principal = "spiffe://example.org/ns/default/sa/web"
    http = attrs.request.http
    http.method = method
    http.path = path
    for name, value in (headers or {}).items():
        http.headers[name] = value
    http.body = body
    http.raw_body = raw_body
    return request


def _build(request: external_auth_pb2.CheckRequest, **options: Any) -> RegoInput:
    return build_input(request, build_view(request), **options)


def _body(
    content_type: str | None,
    body: str = "",
    *,
    raw_body: bytes = b"",
    headers: dict[str, str] | None = None,
    **options: Any,
) -> RegoInput:
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["content-type"] = content_type
    return _build(_request(headers=all_headers, body=body, raw_body=raw_body), **options)


# --- the protobuf JSON part -----------------------------------------------------------------


def _realistic() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    attrs.source.address.socket_address.address = "10.1.2.3"
    attrs.source.address.socket_address.port_value = 51234
    attrs.source.principal = "spiffe://example.org/ns/shop/sa/productpage"
    attrs.destination.address.socket_address.address = "10.1.2.4"
    attrs.destination.address.socket_address.port_value = 9080
    attrs.destination.principal = "spiffe://example.org/ns/shop/sa/reviews"
    attrs.request.time.seconds = 1767225600
    attrs.request.time.nanos = 123456000
    http = attrs.request.http
    http.id = "13359530607844510314"
    http.method = "POST"
    http.path = "/api/v1/reviews/42?lang=en&x=1"
    http.host = "reviews.shop.svc:9080"
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    http.size = 27
    http.body = '{"rating": 5, "text": "ok"}'
    for name, value in {
        ":authority": "reviews.shop.svc:9080",
        ":method": "POST",
        ":path": http.path,
        ":scheme": "http",
        "accept": "*/*",
        "content-type": "application/json",
        "content-length": "27",
        "user-agent": "curl/8.5.0",
        "x-forwarded-proto": "http",
        "x-request-id": "7a52cf15-dda2-4e2f-b063-75f71ca23a6e",
        "authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig",
        "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
        "x-b3-spanid": "e457b5a2e4d86bd1",
        "x-b3-sampled": "1",
        "x-envoy-auth-partial-body": "false",
    }.items():
        http.headers[name] = value
    attrs.context_extensions["namespace"] = "shop"
    attrs.context_extensions["labels"] = "app=reviews,version=v1"
    attrs.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {"https://issuer": {"sub": "alice", "aud": ["reviews"], "exp": 1767229200}}
    )
    attrs.tls_session.sni = "outbound_.9080_._.reviews.shop.svc.cluster.local"
    return request


def test_realistic_request_document() -> None:
    result = _build(_realistic())
    document = result.document
    assert result.body_error is None
    assert _protobuf_part(document) == _reference(_realistic())
    http = document["attributes"]["request"]["http"]
    assert http["method"] == "POST"
    assert http["size"] == "27"  # int64: a string, as protojson writes it
    assert http["headers"]["content-type"] == "application/json"
    assert document["attributes"]["source"]["address"]["socketAddress"] == {
        "address": "10.1.2.3",
        "portValue": 51234,
    }
    assert document["attributes"]["request"]["time"] == "2026-01-01T00:00:00.123456Z"
    assert document["attributes"]["metadataContext"]["filterMetadata"] == {
        "envoy.filters.http.jwt_authn": {
            "https://issuer": {"sub": "alice", "aud": ["reviews"], "exp": 1767229200}
        }
    }
    assert document["attributes"]["tlsSession"] == {
        "sni": "outbound_.9080_._.reviews.shop.svc.cluster.local"
    }
    assert document["version"] == {"ext_authz": "v3", "encoding": "protojson"}
    assert document["parsed_path"] == ["api", "v1", "reviews", "42"]
    assert document["parsed_query"] == {"lang": ["en"], "x": ["1"]}
    assert document["parsed_body"] == {"rating": 5, "text": "ok"}
    assert document["truncated_body"] is False
    json.dumps(document, allow_nan=False)


def _any(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _case_minimal() -> external_auth_pb2.CheckRequest:
    return external_auth_pb2.CheckRequest()


def _case_zero_values_left_out() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = ""
    http.size = 0
    http.raw_body = b""
    request.attributes.source.principal = ""
    # An empty message that is set is written as {}, like protojson does.
    request.attributes.tls_session.SetInParent()
    return request


def _case_addresses() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    source = request.attributes.source.address.socket_address
    source.protocol = address_pb2.SocketAddress.UDP
    source.address = "::1"
    source.named_port = "http"
    source.resolver_name = "custom"
    source.ipv4_compat = True
    request.attributes.destination.address.pipe.path = "/run/app.sock"
    request.attributes.destination.address.pipe.mode = 0o600
    return request


def _case_port_zero_in_oneof() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    # A oneof member has presence: port 0, set, is written (protojson does too).
    request.attributes.source.address.socket_address.port_value = 0
    request.attributes.destination.address.envoy_internal_address.server_listener_name = "l1"
    return request


def _case_peers() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    for peer in (request.attributes.source, request.attributes.destination):
        peer.service = "svc"
        peer.labels["app"] = "web"
        peer.labels["version"] = "v1"
        peer.principal = "spiffe://example.org/ns/a/sa/b"
        peer.certificate = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    return request


def _case_timestamps() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.time.SetInParent()  # the epoch, present
    return request


def _case_timestamp_nanos() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.time.seconds = 253402300799  # 9999-12-31T23:59:59
    request.attributes.request.time.nanos = 1
    return request


def _case_raw_body_and_header_map() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.raw_body = b"\x00\xff\xfe binary"
    http.size = -1
    http.header_map.headers.add(key="x-raw", raw_value=b"caf\xc3\xa9")
    http.header_map.headers.add(key="x-plain", value="v")
    http.query = "unused"
    http.fragment = "frag"
    return request


def _case_metadata() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    metadata = request.attributes.metadata_context
    metadata.filter_metadata["envoy.filters.http.jwt_authn"].update(
        {
            "issuer": {
                "sub": "alice",
                "groups": ["a", "b", [1, 2.5, None, True, {"deep": {}}]],
                "null": None,
                "false": False,
                "empty_list": [],
                "empty": {},
                "unicode": "\u00e9\u4e2d\U0001f600",
            }
        }
    )
    metadata.filter_metadata["empty"].SetInParent()
    metadata.typed_filter_metadata["typed"].CopyFrom(_any(wrappers_pb2.StringValue(value="x")))
    metadata.typed_filter_metadata["address"].CopyFrom(
        _any(address_pb2.SocketAddress(address="1.2.3.4", port_value=80))
    )
    request.attributes.route_metadata_context.filter_metadata["route"].update({"k": "v"})
    return request


def _case_context_extensions() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    request.attributes.context_extensions["namespace"] = "ns"
    request.attributes.context_extensions[""] = "empty key"
    request.attributes.context_extensions["k"] = ""
    request.attributes.tls_session.sni = "example.org"
    return request


PROTOBUF_CASES = {
    case.__name__.removeprefix("_case_"): case
    for case in (
        _realistic,
        _case_minimal,
        _case_zero_values_left_out,
        _case_addresses,
        _case_port_zero_in_oneof,
        _case_peers,
        _case_timestamps,
        _case_timestamp_nanos,
        _case_raw_body_and_header_map,
        _case_metadata,
        _case_context_extensions,
    )
}


@pytest.mark.parametrize("name", sorted(PROTOBUF_CASES))
def test_protobuf_part_equals_message_to_dict(name: str) -> None:
    request = PROTOBUF_CASES[name]()
    # These requests do not all name a workload; the view only feeds body parsing.
    result = build_input(request, RequestView(workload_namespace="default"))
    assert _protobuf_part(result.document) == _reference(request)
    json.dumps(result.document, allow_nan=False)


def _random_text(rng: random.Random) -> str:
    alphabet = 'abcXYZ019 -_./:?=&%+\u00e9\u4e2d\U0001f600"\\\n'
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "num", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return _random_text(rng)
    if kind == "num":
        return rng.choice([0, 1, -1, 2**53, 0.5, -1e-300, 1e300, rng.random()])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {_random_text(rng): _random_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _random_request(rng: random.Random) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    attrs = request.attributes
    for peer in (attrs.source, attrs.destination):
        if rng.random() < 0.7:
            sock = peer.address.socket_address
            sock.address = rng.choice(["10.0.0.1", "::1", "", "fe80::1%eth0"])
            if rng.random() < 0.8:
                sock.port_value = rng.choice([0, 1, 80, 65535])
            else:
                sock.named_port = _random_text(rng)
            sock.protocol = rng.choice(
                [address_pb2.SocketAddress.TCP, address_pb2.SocketAddress.UDP]
            )
        if rng.random() < 0.5:
            peer.principal = _random_text(rng)
        for _ in range(rng.randrange(0, 3)):
            peer.labels[_random_text(rng)] = _random_text(rng)
    if rng.random() < 0.8:
        attrs.request.time.seconds = rng.randrange(0, 253402300799)
        attrs.request.time.nanos = rng.choice([0, 1000000, 1000, 1, rng.randrange(0, 10**9)])
    http = attrs.request.http
    for field in ("id", "method", "path", "host", "scheme", "protocol", "body"):
        if rng.random() < 0.6:
            setattr(http, field, _random_text(rng))
    if rng.random() < 0.5:
        http.size = rng.choice([-1, 0, 1, 2**40, 2**63 - 1])
    if rng.random() < 0.3:
        http.raw_body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20)))
    for _ in range(rng.randrange(0, 20)):
        http.headers[_random_text(rng)] = _random_text(rng)
    for _ in range(rng.randrange(0, 3)):
        http.header_map.headers.add(key=_random_text(rng), raw_value=_random_text(rng).encode())
    for _ in range(rng.randrange(0, 3)):
        attrs.context_extensions[_random_text(rng)] = _random_text(rng)
    for _ in range(rng.randrange(0, 3)):
        fields = {_random_text(rng): _random_value(rng) for _ in range(rng.randrange(0, 4))}
        attrs.metadata_context.filter_metadata[_random_text(rng)].update(fields)
    if rng.random() < 0.3:
        attrs.route_metadata_context.filter_metadata["r"].update({"v": _random_value(rng)})
    if rng.random() < 0.3:
        attrs.tls_session.sni = _random_text(rng)
    return request


def test_protobuf_part_equals_message_to_dict_on_generated_requests() -> None:
    rng = random.Random(20240611)
    view = RequestView(workload_namespace="default")
    for _ in range(300):
        request = _random_request(rng)
        # The path must parse for a document to be built at all; this test is about
        # the protobuf part, the path tests are below.
        request.attributes.request.http.path = request.attributes.request.http.path.replace(
            "%", ""
        ).replace(";", "")
        result = build_input(request, view, parse_body=False)
        assert _protobuf_part(result.document) == _reference(request), request


def test_non_finite_struct_number_is_refused_like_protojson() -> None:
    request = _request()
    request.attributes.metadata_context.filter_metadata["f"].update({"n": float("nan")})
    with pytest.raises(json_format.SerializeToJsonError):
        _reference(request)
    with pytest.raises(BadRequestError) as caught:
        _build(request)
    assert caught.value.reason == "invalid_message"


@pytest.mark.parametrize(("seconds", "nanos"), [(-62135596801, 0), (253402300800, 0), (0, -1)])
def test_timestamp_out_of_range_is_refused_like_protojson(seconds: int, nanos: int) -> None:
    request = _request()
    request.attributes.request.time.seconds = seconds
    request.attributes.request.time.nanos = nanos
    with pytest.raises(json_format.SerializeToJsonError):
        _reference(request)
    with pytest.raises(BadRequestError) as caught:
        _build(request)
    assert caught.value.reason == "invalid_message"


def test_any_of_unknown_type_is_refused_like_protojson() -> None:
    request = _request()
    unknown = any_pb2.Any(type_url="type.googleapis.com/no.such.Type", value=b"\x08\x01")
    request.attributes.metadata_context.typed_filter_metadata["t"].CopyFrom(unknown)
    with pytest.raises(BadRequestError) as caught:
        _build(request)
    assert caught.value.reason == "invalid_message"


def test_struct_values_are_plain_json() -> None:
    request = _request()
    payload = struct_pb2.Struct()
    payload.update({"n": 1, "l": [None, {"x": True}]})
    request.attributes.metadata_context.filter_metadata["f"].CopyFrom(payload)
    document = _build(request).document
    assert document["attributes"]["metadataContext"]["filterMetadata"]["f"] == {
        "n": 1.0,
        "l": [None, {"x": True}],
    }


def test_document_is_a_fresh_copy() -> None:
    request = _realistic()
    first = _build(request).document
    first["attributes"]["request"]["http"]["headers"]["accept"] = "changed"
    first["version"]["ext_authz"] = "changed"
    second = _build(request).document
    assert second["attributes"]["request"]["http"]["headers"]["accept"] == "*/*"
    assert second["version"] == dict(VERSION)
    assert request.attributes.request.http.headers["accept"] == "*/*"


# --- parsed_path and parsed_query ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parsed_path", "parsed_query"),
    [
        ("/my/test/path", ["my", "test", "path"], {}),
        ("", [""], {}),
        ("/", [""], {}),
        ("/a/", ["a", ""], {}),
        ("//a//b", ["a", "", "b"], {}),
        ("relative/path", ["relative", "path"], {}),
        ("/a%2Fb", ["a", "b"], {}),  # decoded before the split, as OPA-Envoy does
        ("%2Fmy%2Ftest%2Fpath?a=1&a=new%0aline", ["my", "test", "path"], {"a": ["1", "new\nline"]}),
        ("/%2Fmy%2Ftest%2Fpath?a=1", ["my", "test", "path"], {"a": ["1"]}),
        ("/a+b%20c", ["a+b c"], {}),  # "+" is only a space in the query
        ("/caf%C3%A9", ["caf\u00e9"], {}),
        ("/caf\u00e9", ["caf\u00e9"], {}),
        ("/%FF/%e2%82", ["\ufffd", "\ufffd\ufffd"], {}),  # one U+FFFD per byte, like Go
        ("/a#frag", ["a#frag"], {}),  # no fragment handling, as OPA-Envoy
        ("/p?a=1&a=2&b=2", ["p"], {"a": ["1", "2"], "b": ["2"]}),
        ("/p?a", ["p"], {"a": [""]}),
        ("/p?a=", ["p"], {"a": [""]}),
        ("/p?=x", ["p"], {"": ["x"]}),
        ("/p?&&a=1&", ["p"], {"a": ["1"]}),
        ("/p?", ["p"], {}),
        ("/p?a=1=2", ["p"], {"a": ["1=2"]}),
        ("/p?a+b=c+d", ["p"], {"a b": ["c d"]}),
        ("/p?a%2Bb=%26%3D", ["p"], {"a+b": ["&="]}),
        ("/p?x=%FF", ["p"], {"x": ["\ufffd"]}),
        ("/p?x=1#f", ["p"], {"x": ["1#f"]}),
        ("/p?x=a?b", ["p"], {"x": ["a?b"]}),
        ("/a%3Fb?c=d", ["a?b"], {"c": ["d"]}),
    ],
)
def test_parsed_path_and_query(
    path: str, parsed_path: list[str], parsed_query: dict[str, list[str]]
) -> None:
    document = _build(_request(path=path), parse_body=False).document
    assert document["parsed_path"] == parsed_path
    assert document["parsed_query"] == parsed_query


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/a%zz", "invalid_path"),
        ("/a%4", "invalid_path"),
        ("/%", "invalid_path"),
        ("/p?a=%zz", "invalid_query"),
        ("/p?%=1", "invalid_query"),
        ("/p?a=1;b=2", "invalid_query"),
        ("/p?a=1&b;", "invalid_query"),
    ],
)
def test_unparseable_path_or_query_fails_the_request(path: str, reason: str) -> None:
    # OPA-Envoy fails the request (getParsedPathAndQuery returns an error); so do we.
    with pytest.raises(BadRequestError) as caught:
        _build(_request(path=path))
    assert caught.value.reason == reason


def test_tcp_check_has_empty_path() -> None:
    request = _request(method="")
    request.attributes.request.http.path = ""
    document = build_input(request, RequestView(workload_namespace="d", is_http=False)).document
    assert document["parsed_path"] == [""]
    assert document["parsed_query"] == {}
    assert document["parsed_body"] is None
    assert document["truncated_body"] is False


# --- parsed_body and truncated_body --------------------------------------------------------

MULTIPART = (
    "--foo\r\n"
    'Content-Disposition: form-data; name="foo"\r\n'
    "Content-Type: text/plain\r\n"
    "\r\n"
    "bar\r\n"
    "--foo\r\n"
    'Content-Disposition: form-data; name="bar"\r\n'
    "Content-Type: application/json;\r\n"
    "\r\n"
    '{"name": "bar"}\r\n'
    "--foo--\r\n"
)
# OPA-Envoy's own test body: bare LF line ends, and whitespace after the close.
MULTIPART_LF = (
    '--foo\nContent-Disposition: form-data; name="foo"\nContent-Type: text/plain\n\nbar\n--foo--\n'
)


def _multipart(*parts: str, boundary: str = "b", preamble: str = "", epilogue: str = "") -> str:
    body = preamble
    for part in parts:
        body += f"--{boundary}\r\n{part}\r\n"
    return body + f"--{boundary}--\r\n{epilogue}"


def _part(name: str, value: str, *extra: str) -> str:
    headers = [f'Content-Disposition: form-data; name="{name}"', *extra]
    return "\r\n".join(headers) + "\r\n\r\n" + value


MP = "multipart/form-data; boundary=b"


@pytest.mark.parametrize(
    ("content_type", "body", "parsed", "truncated"),
    [
        (None, '{"a": 1}', None, False),
        ("text/html", "<p>", None, False),
        ("application/json", '"foo"', "foo", False),
        ("application/json", "true", True, False),
        ("application/json", "42", 42, False),
        ("application/json", "-1.5e3", -1500.0, False),
        ("application/json", "null", None, False),
        (
            "application/json",
            '{"firstname": "foo", "lastname": "bar"}',
            {"firstname": "foo", "lastname": "bar"},
            False,
        ),
        ("application/json", '["hello", "opa"]', ["hello", "opa"], False),
        (
            "application/json",
            r'["\"", "\\", "\/", "/", "\b", "\f", "\n", "\r", "\t", "\u0041"]',
            ['"', "\\", "/", "/", "\b", "\f", "\n", "\r", "\t", "A"],
            False,
        ),
        ("application/json", ' \n{"a": [1, {"b": null}]}\t\r\n', {"a": [1, {"b": None}]}, False),
        ("application/json", '{"a": 1, "a": 2}', {"a": 2}, False),
        ("application/json", '"\\ud83d\\ude00"', "\U0001f600", False),
        ("application/json", '"\\ud800x"', "\ufffdx", False),  # lone surrogate, as Go
        ("application/json", "", None, False),
        ("application/json; charset=utf-8", "[1]", [1], False),
        ("application/json-patch+json", "[]", [], False),  # a substring match, as OPA-Envoy
        ("Application/JSON", "[1]", None, False),  # and a case-sensitive one
        ("application/vnd.api+json", "[1]", None, False),
        ("application/grpc", "\x00\x00\x00\x00\x00", None, False),
        (
            "application/x-www-form-urlencoded",
            "firstname=foo&lastname=bar",
            {"firstname": ["foo"], "lastname": ["bar"]},
            False,
        ),
        ("application/x-www-form-urlencoded", "a=1&a=2&b", {"a": ["1", "2"], "b": [""]}, False),
        ("application/x-www-form-urlencoded", "a+b=%41%2B", {"a b": ["A+"]}, False),
        ("application/x-www-form-urlencoded", "&", {}, False),
        ("application/x-www-form-urlencoded", "", None, False),
        (MP, _multipart(_part("foo", "bar")), {"foo": ["bar"]}, False),
        (
            "multipart/form-data; boundary=foo",
            MULTIPART,
            {"foo": ["bar"], "bar": [{"name": "bar"}]},
            False,
        ),
        ("multipart/form-data; boundary=foo", MULTIPART_LF, {"foo": ["bar"]}, False),
        (
            MP,
            _multipart(_part("a", "1"), _part("a", "2"), _part("b", "")),
            {"a": ["1", "2"], "b": [""]},
            False,
        ),
        (
            MP,
            _multipart(
                _part("f", "line1\r\nline2\r\n--bnot-a-boundary", "Content-Type: text/plain")
            ),
            {"f": ["line1\r\nline2\r\n--bnot-a-boundary"]},
            False,
        ),
        (
            MP,
            _multipart(_part("a", "1"), preamble="preamble line\r\n", epilogue="epilogue"),
            {"a": ["1"]},
            False,
        ),
        (
            MP,
            _multipart(
                'Content-Disposition: form-data; name="file"; filename="a.txt"\r\n'
                "Content-Type: application/octet-stream\r\n\r\nfile content",
                'Content-Disposition: attachment; name="x"\r\n\r\nskipped',
                "Content-Disposition: form-data\r\n\r\nno name: skipped",
                "Content-Type: text/plain\r\n\r\nno disposition: skipped",
                "Content-Disposition: form-data; name=token\r\n\r\nunquoted",
                "Content-Disposition: form-data; name*=UTF-8''caf%C3%A9\r\n\r\nrfc 2231",
                'Content-Disposition: form-data; name="q\\"uote"\r\n\r\nescaped',
                "content-disposition: FORM-DATA; NAME=lower\r\n\r\ncase-insensitive",
                "Content-Disposition:form-data;name=x;\r\n\r\ntight",
            ),
            {
                "file": ["file content"],
                "token": ["unquoted"],
                "caf\u00e9": ["rfc 2231"],
                'q"uote': ["escaped"],
                "lower": ["case-insensitive"],
                "x": ["tight"],
            },
            False,
        ),
        (
            MP,
            _multipart(
                _part("qp", "caf=C3=A9 =\r\nsoft", "Content-Transfer-Encoding: quoted-printable")
            ),
            {"qp": ["caf\u00e9 soft"]},
            False,
        ),
        (
            MP,
            _multipart(
                'Content-Disposition: form-data;\r\n name="folded"\r\n\r\ncontinuation line'
            ),
            {"folded": ["continuation line"]},
            False,
        ),
        (MP, _multipart(_part("e", "")), {"e": [""]}, False),
        (MP, "--b--", {}, False),
        (
            'multipart/form-data; boundary="b c"',
            _multipart(_part("a", "1"), boundary="b c"),
            {"a": ["1"]},
            False,
        ),
        (
            "multipart/form-data; boundary=b; charset=utf-8;",
            _multipart(_part("a", "1")),
            {"a": ["1"]},
            False,
        ),
        ("multipart/form-data", _multipart(_part("a", "1")), None, False),  # no boundary
        ("multipart/mixed; boundary=b", _multipart(_part("a", "1")), None, False),
    ],
)
def test_parsed_body(content_type: str | None, body: str, parsed: Any, truncated: bool) -> None:
    result = _body(content_type, body)
    assert result.body_error is None, result.body_error_detail
    assert result.document["parsed_body"] == parsed
    assert result.document["truncated_body"] is truncated
    json.dumps(result.document, allow_nan=False)


@pytest.mark.parametrize(
    ("headers", "body", "parsed", "truncated"),
    [
        ({"content-length": "1000"}, "true", None, True),
        ({"content-length": "4"}, "true", True, False),
        ({"content-length": "2"}, "true", True, False),  # smaller: not truncated
        ({"content-length": "-1"}, "true", True, False),
        ({"content-length": "+4"}, "true", True, False),  # strconv.ParseInt takes a sign
        # 3 characters, 4 bytes: content-length counts bytes.
        ({"content-length": "4"}, '"\u00e9"', "\u00e9", False),
        ({"content-length": "5"}, '"\u00e9"', None, True),
        ({"x-envoy-auth-partial-body": "true"}, "true", None, True),
        ({"x-envoy-auth-partial-body": "false"}, "true", True, False),
        ({"x-envoy-auth-partial-body": "True"}, "true", True, False),
    ],
)
def test_truncated_json_body(
    headers: dict[str, str], body: str, parsed: Any, truncated: bool
) -> None:
    result = _body("application/json", body, headers=headers)
    assert result.body_error is None
    assert result.document["parsed_body"] == parsed
    assert result.document["truncated_body"] is truncated


def test_truncated_form_and_multipart_bodies() -> None:
    form = _body("application/x-www-form-urlencoded", "a=1", headers={"content-length": "100"})
    assert form.document["parsed_body"] is None
    assert form.document["truncated_body"] is True
    multipart = _body(MP, _multipart(_part("a", "1")), headers={"content-length": "100000"})
    assert multipart.document["parsed_body"] is None
    assert multipart.document["truncated_body"] is True


def test_envoy_partial_body_header_wins_whatever_the_content_type() -> None:
    for content_type in (None, "text/plain", "application/grpc", "application/json"):
        result = _body(content_type, "", headers={"x-envoy-auth-partial-body": "true"})
        assert result.document["parsed_body"] is None
        assert result.document["truncated_body"] is True


def test_empty_body_is_not_truncated_whatever_content_length_says() -> None:
    # OPA-Envoy returns before looking at content-length when there is no body.
    result = _body("application/json", "", headers={"content-length": "10"})
    assert result.document["parsed_body"] is None
    assert result.document["truncated_body"] is False


def test_raw_body_is_parsed_when_body_is_empty() -> None:
    # Envoy with pack_as_bytes sends raw_body instead of body.
    assert _body("application/json", raw_body=b'{"a": 1}').document["parsed_body"] == {"a": 1}
    form = _body("application/x-www-form-urlencoded", raw_body=b"a=%C3%A9")
    assert form.document["parsed_body"] == {"a": ["\u00e9"]}
    multipart = _body(MP, raw_body=_multipart(_part("a", "\u00e9")).encode())
    assert multipart.document["parsed_body"] == {"a": ["\u00e9"]}
    truncated = _body("application/json", raw_body=b"[1]", headers={"content-length": "4"})
    assert truncated.document["truncated_body"] is True


def test_body_wins_over_raw_body() -> None:
    result = _body("application/json", "[1]", raw_body=b"[2]")
    assert result.document["parsed_body"] == [1]


def test_non_utf8_raw_body_reads_as_go_reads_it() -> None:
    # Inside a JSON string an invalid byte becomes U+FFFD (Go's decoder); outside one it
    # is a syntax error. Form and multipart values keep their bytes as U+FFFD.
    inside = _body("application/json", raw_body=b'{"a": "x\xff\xfey"}')
    assert inside.document["parsed_body"] == {"a": "x\ufffd\ufffdy"}
    outside = _body("application/json", raw_body=b'{"a": 1}\xff')
    assert outside.body_error == "invalid_json"
    assert "parsed_body" not in outside.document
    form = _body("application/x-www-form-urlencoded", raw_body=b"a=\xff&b=%FF&c=\xe2%82%AC")
    # Go unescapes bytes, so a raw byte and two escaped ones can still make one "€".
    assert form.document["parsed_body"] == {"a": ["\ufffd"], "b": ["\ufffd"], "c": ["\u20ac"]}
    binary = _multipart(_part("file", "PNG")).encode().replace(b"PNG", b"\x89PNG\r\n\x1a\n\x00")
    upload = _body(MP, raw_body=binary)
    assert upload.document["parsed_body"] == {"file": ["\ufffdPNG\r\n\x1a\n\x00"]}
    json.dumps(upload.document, allow_nan=False)


def test_header_map_headers_drive_body_parsing() -> None:
    # Envoy's encode_raw_headers sends header_map instead of headers; the view reads both.
    request = _request(body='{"a": 1}')
    request.attributes.request.http.header_map.headers.add(
        key="Content-Type", raw_value=b"application/json"
    )
    assert _build(request).document["parsed_body"] == {"a": 1}


@pytest.mark.parametrize(
    ("content_type", "body", "headers", "reason"),
    [
        ("application/json", '["foo" : 42}', {}, "invalid_json"),
        ("application/json", "{} x", {}, "invalid_json"),
        ("application/json", "{}{}", {}, "invalid_json"),
        ("application/json", "   ", {}, "invalid_json"),
        ("application/json", "NaN", {}, "invalid_json"),
        ("application/json", "[Infinity]", {}, "invalid_json"),
        # Go keeps 1e400 as a json.Number; a Python float cannot hold it (documented).
        ("application/json", "1e400", {}, "invalid_json"),
        ("application/json", "01", {}, "invalid_json"),
        ("application/json", '"tab\tinside"', {}, "invalid_json"),
        ("application/json", "\ufeff{}", {}, "invalid_json"),
        ("application/json", "[" * 100_000 + "]" * 100_000, {}, "invalid_json"),
        ("application/json", "true", {"content-length": "abc"}, "invalid_content_length"),
        ("application/json", "true", {"content-length": " 4"}, "invalid_content_length"),
        ("application/json", "true", {"content-length": "1_0"}, "invalid_content_length"),
        (
            "application/json",
            "true",
            {"content-length": "99999999999999999999"},
            "invalid_content_length",
        ),
        ("application/x-www-form-urlencoded", "a=1;b=2", {}, "invalid_form_body"),
        ("application/x-www-form-urlencoded", "a=%zz", {}, "invalid_form_body"),
        (
            "application/x-www-form-urlencoded",
            "a=1",
            {"content-length": "x"},
            "invalid_content_length",
        ),
        (MP, _multipart(_part("a", "1"), boundary="other"), {}, "invalid_multipart_body"),
        (
            'multipart/form-data; boundary=""',
            _multipart(_part("a", "1")),
            {},
            "invalid_multipart_body",
        ),
        (
            "multipart/form-data; boundary",
            _multipart(_part("a", "1")),
            {},
            "invalid_multipart_body",
        ),
        (
            "multipart/form-data boundary=b",
            _multipart(_part("a", "1")),
            {},
            "invalid_multipart_body",
        ),
        (
            "multipart/form-data; boundary=b; boundary=c",
            _multipart(_part("a", "1")),
            {},
            "invalid_multipart_body",
        ),
        (MP, "--b\r\n" + _part("a", "never closed"), {}, "invalid_multipart_body"),
        (MP, "--b\r\nContent-Disposition: form-data; name=a\r\n", {}, "invalid_multipart_body"),
        (MP, _multipart("no colon here\r\n\r\nvalue"), {}, "invalid_multipart_body"),
        (
            MP,
            _multipart(" Content-Disposition: form-data; name=a\r\n\r\nv"),
            {},
            "invalid_multipart_body",
        ),
        (MP, _multipart("Bad Key@: v\r\n\r\nv"), {}, "invalid_multipart_body"),
        (
            MP,
            _multipart(_part("j", "{not json", "Content-Type: application/json")),
            {},
            "invalid_multipart_body",
        ),
        (MP, "--b\r\n" + _part("a", "1") + "\r\n--b\r\njunk", {}, "invalid_multipart_body"),
        (MP, "--b\r\n" + _part("a", "1") + "\r\n--b\tjunk\r\n--b--", {}, "invalid_multipart_body"),
        (MP, "just text, no boundary at all", {}, "invalid_multipart_body"),
    ],
)
def test_body_that_does_not_parse_leaves_parsed_body_out(
    content_type: str, body: str, headers: dict[str, str], reason: str
) -> None:
    result = _body(content_type, body, headers=headers)
    assert result.body_error == reason
    assert result.body_error_detail
    assert "parsed_body" not in result.document
    assert result.document["truncated_body"] is False
    # Everything else is there: the request is still decided, on what could be read.
    assert result.document["attributes"]["request"]["http"]["body"] == body
    assert result.document["parsed_path"] == [""]


def test_huge_body_is_not_parsed_past_the_limit() -> None:
    small_limit = _body("application/json", "[1, 2, 3]", max_body_bytes=8)
    assert small_limit.body_error == "body_too_large"
    assert "parsed_body" not in small_limit.document
    assert small_limit.document["truncated_body"] is False

    huge = "[" + ",".join(["1"] * (600 * 1024)) + "]"  # 1.2 MB
    over = _body("application/json", huge)
    assert over.body_error == "body_too_large"
    assert over.document["attributes"]["request"]["http"]["body"] == huge

    under = _body("application/json", huge, max_body_bytes=2 * 1024 * 1024)
    assert under.body_error is None
    assert len(under.document["parsed_body"]) == 600 * 1024

    # A truncated body is reported as truncated, whatever its size.
    cut = _body("application/json", huge, headers={"x-envoy-auth-partial-body": "true"})
    assert cut.body_error is None
    assert cut.document["truncated_body"] is True

    # Not parsed at all, so no limit applies.
    plain = _body("text/plain", huge)
    assert plain.body_error is None
    assert plain.document["parsed_body"] is None


def test_body_parsing_can_be_skipped() -> None:
    # OPA-Envoy's skip-request-body-parse: neither key, and no opinion on the body.
    for body in ('{"a": 1}', "{broken"):
        result = _body("application/json", body, headers={"content-length": "x"}, parse_body=False)
        assert "parsed_body" not in result.document
        assert "truncated_body" not in result.document
        assert result.body_error is None
        assert result.document["parsed_path"] == [""]
        assert result.document["attributes"]["request"]["http"]["body"] == body


def test_header_limits_are_the_request_views() -> None:
    # build_input reads headers through the view; a request over build_view's limits
    # never gets that far.
    request = _request(headers={f"h{i}": "v" for i in range(5)})
    with pytest.raises(BadRequestError) as caught:
        build_view(request, max_headers=3)
    assert caught.value.reason == "too_many_headers"
