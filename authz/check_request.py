"""Envoy ``CheckRequest`` → ``RequestView``: the input edge of ext_authz, pure.

Fields are read straight from the protobuf message (no ``MessageToDict`` round
trip: this runs for every request in the mesh). Anything malformed or over a limit
raises ``BadRequestError`` with a named reason and the server denies (fail closed).

Where each attribute comes from:

- ``source_principal``: ``attributes.source.principal``, which Envoy fills with the
  URI SAN of the verified peer certificate. Istio principals have no scheme, so
  ``spiffe://`` is stripped; any other value (a DNS SAN, a subject) is not a SPIFFE
  identity and gives None, as if there were no mTLS.
- ``source_ip``: ``attributes.source.address`` (the connection's peer, after any
  PROXY protocol), which is what Istio's ``source.ip`` (Envoy ``direct_remote_ip``)
  means.
- ``remote_ip`` (Istio ``remote.ip``, Envoy ``remote_ip``): the original client as
  Envoy's HTTP connection manager derives it from ``x-forwarded-for``. Headers
  are trusted only as far as ``xff_num_trusted_hops`` says, exactly like Envoy's
  setting of that name: with 0 (the default) no header is trusted and ``remote_ip``
  is the source address, because a sidecar's XFF is whatever the client wrote.
  With N > 0 the client is the (N+1)-th address from the right of the
  ``x-forwarded-for`` that reached us (Envoy with ``use_remote_address`` has
  already appended the immediate peer, which counts as the first hop); fewer
  entries than that fall back to the source address, as Envoy does.
  ``x-envoy-external-address`` is not read: Envoy derives it from the same XFF
  with the same hop count, and only sets it for external requests.
- ``destination_ip`` / ``destination_port``: ``attributes.destination.address``.
- ``method`` / ``host`` / ``path``: the dedicated ``request.http`` fields, not the
  ``:method`` / ``:authority`` / ``:path`` pseudo headers that Envoy also sends.
- ``headers``: ``request.http.headers`` (or ``header_map`` when Envoy is configured
  with ``encode_raw_headers``), names lowercased, repeated names joined with ","
  as Envoy joins them. Pseudo headers are kept: Istio's header matcher sees them.
- ``is_http``: ``request.http.method`` is non-empty (a TCP ``network.ext_authz``
  check has no HTTP request).
- ``sni``: ``attributes.tls_session.sni``.
- ``request_auth``: the JWT payload that Envoy's ``jwt_authn`` filter verified.
  Istio configures ``payload_in_metadata: <issuer>``, so
  ``metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]`` holds one
  Struct under one key; that Struct is the payload. More than one payload is
  ambiguous and denied. The ``Authorization`` header is never read.
- ``filter_metadata``: every ``metadata_context.filter_metadata`` entry whose
  filter name starts with ``envoy.filters.`` (what ``experimental.envoy.filters.*``
  conditions address), converted to plain dicts.
- workload: ``context_extensions`` ``namespace``, ``labels`` (``k=v,k2=v2``) and
  optional ``service``; the namespace falls back to the one in
  ``attributes.destination.principal`` (``spiffe://td/ns/<ns>/sa/<sa>``). No
  namespace at all is ``no_workload_namespace``: we cannot know which policies
  apply, so we must not guess.

What can arrive: protobuf ``string`` fields are valid UTF-8 by construction (the
parser rejects anything else before this code runs), so the path and
``headers`` map are text. ``header_map`` entries may carry ``raw_value`` bytes,
which are decoded strictly (``non_utf8_header``). The body (``body``/``raw_body``)
is never read.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2

from authz.errors import BadRequestError
from authz.request_view import RequestView

__all__ = ["JWT_AUTHN_FILTER", "build_view", "parse_labels"]

JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
_SPIFFE_SCHEME = "spiffe://"
_FILTER_PREFIX = "envoy.filters."
# C0 controls and DEL; one regex scan is cheaper than a per-character loop.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def build_view(
    request: external_auth_pb2.CheckRequest,
    *,
    max_headers: int = 200,
    max_header_bytes: int = 64 * 1024,
    xff_num_trusted_hops: int = 0,
) -> RequestView:
    """Extract everything the engines read from one CheckRequest.

    Raises ``BadRequestError`` (``reason`` names the problem) for input that must
    be denied rather than evaluated.
    """
    attrs = request.attributes
    http = attrs.request.http

    source_ip = _socket_ip(attrs.source.address)
    headers = _headers(http, max_headers=max_headers, max_header_bytes=max_header_bytes)
    is_http = bool(http.method)
    namespace, labels, service = _workload(attrs)

    path: str | None = None
    if is_http:
        path = http.path
        _check_path(path)

    return RequestView(
        workload_namespace=namespace,
        workload_labels=labels,
        workload_service=service,
        source_principal=_spiffe_principal(attrs.source.principal),
        source_ip=source_ip,
        remote_ip=_remote_ip(headers, source_ip, xff_num_trusted_hops),
        destination_ip=_socket_ip(attrs.destination.address),
        destination_port=_socket_port(attrs.destination.address),
        is_http=is_http,
        method=http.method if is_http else None,
        host=http.host if is_http else None,
        path=path,
        headers=headers,
        sni=attrs.tls_session.sni or None,
        request_auth=_jwt_payload(attrs.metadata_context.filter_metadata),
        filter_metadata=_filter_metadata(attrs.metadata_context.filter_metadata),
    )


def parse_labels(text: str) -> dict[str, str]:
    """Parse ``context_extensions["labels"]`` (``k=v,k2=v2``; empty → no labels).

    A malformed list raises rather than being read partly: a selector matched
    against half the labels could pick the wrong policies.
    """
    labels: dict[str, str] = {}
    if not text.strip():
        return labels
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise BadRequestError("malformed_labels", f"label {item!r} is not key=value")
        if "=" in value:
            raise BadRequestError("malformed_labels", f"label {item!r} has more than one '='")
        if key in labels:
            raise BadRequestError("malformed_labels", f"label {key!r} appears twice")
        labels[key] = value
    return labels


def _spiffe_principal(principal: str) -> str | None:
    if not principal.startswith(_SPIFFE_SCHEME):
        return None
    rest = principal[len(_SPIFFE_SCHEME) :]
    return rest or None


def _socket_ip(address: Any) -> str | None:
    # A pipe (Unix socket) address has no IP; IP conditions then cannot match.
    if not address.HasField("socket_address"):
        return None
    return str(address.socket_address.address) or None


def _socket_port(address: Any) -> int | None:
    if not address.HasField("socket_address"):
        return None
    sock = address.socket_address
    # Envoy always uses port_value for peers; named ports never appear here.
    return int(sock.port_value) if sock.HasField("port_value") else None


def _headers(http: Any, *, max_headers: int, max_header_bytes: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    count = 0
    size = 0

    def add(name: str, value: str) -> None:
        nonlocal count, size
        count += 1
        size += len(name.encode()) + len(value.encode())
        # Checked while reading, so a huge map costs no more than the limit.
        if count > max_headers:
            raise BadRequestError("too_many_headers", f"more than {max_headers} headers")
        if size > max_header_bytes:
            raise BadRequestError("headers_too_large", f"headers exceed {max_header_bytes} bytes")
        if not name:
            raise BadRequestError("invalid_header_name", "empty header name")
        key = name.lower()
        previous = headers.get(key)
        headers[key] = value if previous is None else f"{previous},{value}"

    for name, value in http.headers.items():
        add(name, value)
    for entry in http.header_map.headers:
        if entry.raw_value:
            try:
                value = entry.raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError(
                    "non_utf8_header", f"header {entry.key!r} is not valid UTF-8"
                ) from None
        else:
            value = entry.value
        add(entry.key, value)
    return headers


def _check_path(path: str) -> None:
    # Envoy's codecs reject these already; a request that still carries them did
    # not come through a sane proxy, and path matching on it would be guesswork.
    if _CONTROL_CHARS.search(path):
        raise BadRequestError("invalid_path", f"path {path!r} contains control characters")


def _remote_ip(headers: Mapping[str, str], source_ip: str | None, trusted_hops: int) -> str | None:
    if trusted_hops <= 0:
        return source_ip
    xff = headers.get("x-forwarded-for")
    if not xff:
        return source_ip
    hops = [hop.strip() for hop in xff.split(",")]
    if len(hops) < trusted_hops + 1:
        return source_ip
    candidate = hops[-(trusted_hops + 1)]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        raise BadRequestError(
            "invalid_forwarded_for", f"x-forwarded-for hop {candidate!r} is not an IP address"
        ) from None


def _workload(attrs: Any) -> tuple[str, dict[str, str], str | None]:
    ext = attrs.context_extensions
    namespace = ext.get("namespace", "").strip()
    if not namespace:
        namespace = _principal_namespace(attrs.destination.principal) or ""
    if not namespace:
        raise BadRequestError(
            "no_workload_namespace",
            "neither context_extensions.namespace nor a destination SPIFFE principal "
            "names the protected workload's namespace",
        )
    labels = parse_labels(ext.get("labels", ""))
    service = ext.get("service", "").strip() or None
    return namespace, labels, service


def _principal_namespace(principal: str) -> str | None:
    if not principal.startswith(_SPIFFE_SCHEME):
        return None
    parts = principal[len(_SPIFFE_SCHEME) :].split("/")
    if len(parts) >= 3 and parts[1] == "ns" and parts[2]:
        return parts[2]
    return None


def _jwt_payload(filter_metadata: Any) -> dict[str, Any] | None:
    if JWT_AUTHN_FILTER not in filter_metadata:
        return None
    entries = filter_metadata[JWT_AUTHN_FILTER]
    payloads = list(entries.items())
    if not payloads:
        return None
    if len(payloads) > 1:
        keys = sorted(key for key, _ in payloads)
        raise BadRequestError(
            "multiple_jwt_payloads", f"jwt_authn metadata holds several payloads: {keys}"
        )
    key, payload = payloads[0]
    if not isinstance(payload, struct_pb2.Struct):
        raise BadRequestError(
            "malformed_jwt_metadata", f"jwt_authn metadata {key!r} is not a JSON object"
        )
    return _struct_to_dict(payload)


def _filter_metadata(filter_metadata: Any) -> dict[str, dict[str, Any]]:
    return {
        name: _struct_to_dict(value)
        for name, value in filter_metadata.items()
        if name.startswith(_FILTER_PREFIX)
    }


def _struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {key: _value(value) for key, value in struct.items()}


def _value(value: Any) -> Any:
    # Struct/ListValue access already yields Python scalars; only containers recurse.
    if isinstance(value, struct_pb2.Struct):
        return _struct_to_dict(value)
    if isinstance(value, struct_pb2.ListValue):
        return [_value(item) for item in value]
    return value
