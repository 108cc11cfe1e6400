"""What the ext_authz server tells the audit trail: dry-run flips, the workload, the request.

- :func:`dry_run_flips`: which dry-run policies would have changed this decision, and
  to what. Istio's shadow engines hold only the dry-run policies of one action, so a
  flip is read against the enforced outcome: a dry-run DENY that matched an allowed
  request would deny it; a dry-run ALLOW that matched a request denied only because
  no ALLOW matched would allow it; a dry-run ALLOW that did not match a request
  allowed because no ALLOW policy applied would deny it (enforcing it would give the
  workload an ALLOW policy). A Rego result that was not enforced, or the full set's
  result with staged packages, flips when its verdict differs from the outcome.
- :func:`request_snapshot`: the CheckRequest as the audit trail may keep it, in
  protobuf binary form, with what :class:`audit.redaction.Redaction` forbids
  replaced by keyed hashes (or, for bodies, removed), and the list of what was.

Both run on every decision: the common case (no dry-run policy, no secret header,
no body) costs a few attribute reads and one ``SerializeToString``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from audit.record import FLIP_TO_ALLOW, FLIP_TO_DENY, split_policy_id
from audit.redaction import Redaction
from authz.istio_engine import IstioDecision
from authz.rego_provider import RegoOutcome

__all__ = ["dry_run_flips", "request_snapshot", "workload_name"]

# Istio's canonical service name comes from these labels, in this order.
_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")


def workload_name(labels: Mapping[str, str], service: str | None) -> str | None:
    """The destination workload's name as Istio's telemetry names it."""
    for label in _NAME_LABELS:
        value = labels.get(label)
        if value:
            return value
    return service


def dry_run_flips(
    *,
    allowed: bool,
    engine: str,
    istio: IstioDecision | None,
    rego: RegoOutcome | None,
    rego_decision: str | None,
) -> tuple[dict[str, str], ...]:
    """Every dry-run policy that would have turned ``allowed`` the other way."""
    flips: list[dict[str, str]] = []
    if istio is not None:
        deny = istio.dry_run_deny
        if deny is not None and not deny.allowed and allowed:
            flips.append(_flip("istio", deny.effective_policy_id, FLIP_TO_DENY))
        shadow = istio.dry_run_allow
        if shadow is not None:
            if shadow.allowed and not allowed and istio.reason == "no_allow_policy_matched":
                if engine == "istio":
                    flips.append(_flip("istio", shadow.effective_policy_id, FLIP_TO_ALLOW))
            elif not shadow.allowed and allowed and istio.action is None:
                flips.extend(_flip("istio", p, FLIP_TO_DENY) for p in shadow.policies)
    if rego is not None:
        if not rego.enforced and not rego.decision.allowed and allowed:
            flips.append(_flip("rego", rego_decision, FLIP_TO_DENY))
        shadow_rego = rego.shadow
        if shadow_rego is not None and shadow_rego.allowed != rego.decision.allowed:
            if not shadow_rego.allowed and allowed:
                flips.extend(_flip("rego", p, FLIP_TO_DENY) for p in rego.dry_run_packages)
            elif shadow_rego.allowed and not allowed and engine == "rego":
                flips.extend(_flip("rego", p, FLIP_TO_ALLOW) for p in rego.dry_run_packages)
    return tuple(flips)


def _flip(engine: str, policy: str | None, to: str) -> dict[str, str]:
    name, _ = split_policy_id(policy)
    return {"engine": engine, "policy": name or "(unnamed)", "to": to}


def request_snapshot(
    request: external_auth_pb2.CheckRequest,
    headers: Mapping[str, str] | None,
    redaction: Redaction,
) -> tuple[bytes, tuple[str, ...]]:
    """The redacted request in binary form, and what was redacted (``header:NAME``,
    ``query:NAME``, ``body``, ``body:truncated``).

    ``headers`` are the request view's (lowercase names), when it could be built. The
    redactions are made on ``request`` itself, serialized and undone (a copy of the
    message cost more than the rest of the audit hand-off): ``request`` is as it was
    when this returns, but no other thread may read it meanwhile.
    """
    http = request.attributes.request.http
    if headers is None or http.HasField("header_map") or http.query or http.body or http.raw_body:
        return _any_request(request, http, headers, redaction)
    # What Envoy sends unless configured otherwise: the header map, the query in the
    # path, no body; most requests have nothing to redact, or a token header. For them
    # the search for JWTs under any header name is one search of the serialized bytes,
    # not one per header value: a mark holds no "eyJ", so an "eyJ" left there sends the
    # request through the full check (as does a certificate whose base64 holds one).
    path = http.path
    if "?" in path and redaction.path(path)[1]:
        return _any_request(request, http, headers, redaction)
    secret = redaction.named_secret_headers(headers)
    if not secret:
        blob = request.SerializeToString()
        return (blob, ()) if b"eyJ" not in blob else _any_request(request, http, headers, redaction)
    map_headers = http.headers
    saved: list[tuple[str, str]] = []
    try:
        # Fewer names in the view than in the map: two spellings of one name.
        spellings = len(headers) < len(map_headers)
        _mark_map_headers(map_headers, secret, redaction, saved, every_spelling=spellings)
        blob = request.SerializeToString()
    finally:
        for key, old in reversed(saved):
            map_headers[key] = old
    if b"eyJ" in blob:
        return _any_request(request, http, headers, redaction)
    return blob, _header_marks(frozenset(secret))


def _any_request(
    request: external_auth_pb2.CheckRequest,
    http: Any,
    headers: Mapping[str, str] | None,
    redaction: Redaction,
) -> tuple[bytes, tuple[str, ...]]:
    """:func:`request_snapshot` of a request of any shape: raw header entries, a query
    field, a body."""
    raw = http.HasField("header_map")  # Envoy's encode_raw_headers: names and bytes
    if headers is None:
        headers = {k.lower(): v for k, v in http.headers.items()}
        if raw:
            headers.update({h.key.lower(): h.value for h in http.header_map.headers})
    secret = redaction.secret_headers(headers)
    if raw:
        secret |= {
            h.key.lower()
            for h in http.header_map.headers
            if h.raw_value and redaction.header_is_secret(h.key.lower(), _text(h.raw_value))
        }
    path, query_marks = redaction.path(http.path) if "?" in http.path else (http.path, ())
    query, query_only_marks = redaction.path("?" + http.query) if http.query else ("", ())
    if not secret and not query_marks and not query_only_marks and not (http.body or http.raw_body):
        return request.SerializeToString(), ()
    map_headers = http.headers
    saved: list[tuple[str, str]] = []  # map entries, restored last
    undo: list[Callable[[], None]] = []
    redacted = list(_header_marks(frozenset(secret)))
    try:
        _mark_map_headers(map_headers, secret, redaction, saved, every_spelling=True)
        if query_marks and ":path" in map_headers:
            old = map_headers[":path"]
            map_headers[":path"] = redaction.path(old)[0]
            saved.append((":path", old))
        for entry in http.header_map.headers if raw else ():
            name = entry.key.lower()
            if name in secret:
                _set_entry(entry, redaction.mark(entry.value or _text(entry.raw_value)), undo)
            elif name == ":path" and query_marks:
                value = redaction.path(entry.value or _text(entry.raw_value))[0]
                _set_entry(entry, value, undo)
        if query_marks:
            _set_field(http, "path", path, undo)
        if query_only_marks:
            _set_field(http, "query", query.removeprefix("?"), undo)
        if query_marks or query_only_marks:
            redacted += dict.fromkeys((*query_marks, *query_only_marks))
        body = http.raw_body or http.body.encode("utf-8", "surrogateescape")
        if body:
            kept = redaction.body(body)
            if kept is None:
                _set_field(http, "body", "", undo)
                _set_field(http, "raw_body", b"", undo)
                redacted.append("body")
            elif len(kept) < len(body):
                if http.raw_body:
                    _set_field(http, "raw_body", kept, undo)
                else:
                    _set_field(http, "body", kept.decode("utf-8", "ignore"), undo)
                redacted.append("body:truncated")
        return request.SerializeToString(), tuple(redacted)
    finally:
        for step in reversed(undo):
            step()
        for key, old in reversed(saved):
            map_headers[key] = old


def _mark_map_headers(
    headers: Any,
    secret: set[str],
    redaction: Redaction,
    saved: list[tuple[str, str]],
    *,
    every_spelling: bool,
) -> None:
    """Replace the values of ``secret`` names (lowercase) in the header map by their
    marks, under every spelling of the name when ``every_spelling`` (else only where
    a lowercase name is missing); the old values go to ``saved``, in order, for the
    caller to restore."""
    # Envoy sends lowercase names, each once; any other spelling is found by a scan.
    keys = [name for name in secret if name in headers]
    if every_spelling or len(keys) < len(secret):
        keys = [k for k in headers if k.lower() in secret]
    for key in keys:
        old = headers[key]
        headers[key] = redaction.mark(old)
        saved.append((key, old))


@functools.lru_cache(maxsize=256)
def _header_marks(names: frozenset[str]) -> tuple[str, ...]:
    # The same few sets of names come back on every request (authorization, cookie).
    return tuple(f"header:{name}" for name in sorted(names))


def _set_entry(entry: Any, value: str, undo: list[Callable[[], None]]) -> None:
    old = entry.value, entry.raw_value
    # A raw_value is what Envoy sends with encode_raw_headers; the mark is always text.
    entry.value, entry.raw_value = "", value.encode()

    def restore() -> None:
        entry.value, entry.raw_value = old

    undo.append(restore)


def _set_field(message: Any, name: str, value: Any, undo: list[Callable[[], None]]) -> None:
    old = getattr(message, name)
    setattr(message, name, value)
    undo.append(lambda: setattr(message, name, old))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")
