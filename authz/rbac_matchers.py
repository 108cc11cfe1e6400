"""One compiled clause → the Envoy RBAC principal or permission that matches exactly the same.

Pure functions returning proto-JSON dicts (``envoy.config.rbac.v3.Principal`` /
``Permission``). The shapes are the ones istiod generates (``pilot/pkg/security/authz``:
values ORed, not* forms under ``not_id``/``not_rule``, principals against the peer
certificate's URI SAN with ``spiffe://``, ``requestPrincipals`` and
``request.auth.*`` against ``jwt_authn``'s ``payload`` metadata, paths with the
``uri_template`` matcher, hosts against ``:authority`` ignoring case). Where istiod's
shape would decide differently from ``authz.istio_engine`` (the reference), the
shape here is changed until it decides the same, and says so:

- principals ``*suffix`` and ``*``: a regex anchored at ``spiffe://`` (and escaped),
  because the engine only knows SPIFFE peers; istiod's ``.+`` also matches a peer
  with a DNS SAN only.
- namespaces, serviceAccounts, trustDomains: one anchored regex for the engine's
  ``<td>/ns/<ns>/sa/<sa>`` (exactly five segments, values escaped); istiod's
  ``.*/ns/<v>/.*`` takes ``*`` and ``.`` in the value as regex and matches longer IDs.
- requestPrincipals: the engine matches the string ``iss/sub``; istiod splits the
  value at its last ``/``. Every split of the value is generated, which matches
  ``iss/sub`` exactly (a ``sub`` with a ``/`` included).
- hosts: the engine also matches the host without its port (``a.com:8080`` for
  ``a.com``); the port forms are added. Case is ASCII-insensitive on both sides.
- ``*`` (present): a non-empty value, as the engine has it (Envoy's ``present_match``
  also matches an empty header).

A value Envoy cannot match exactly raises ``Untranslatable`` naming what to change:
a regex over RE2's program-size limit, a path template segment Envoy's
``uri_template`` rejects, a header name Envoy's config refuses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from authz.istio_policy import (
    Attribute,
    CidrMatch,
    Clause,
    ListValueMatch,
    Matcher,
    MatchKind,
    PathTemplate,
    StringMatch,
)

__all__ = [
    "JWT_AUTHN_FILTER",
    "JWT_PAYLOAD_KEY",
    "PERMISSION_ATTRIBUTES",
    "RE2_MAX_PROGRAM_SIZE",
    "Untranslatable",
    "permission",
    "principal",
]

JSON = dict[str, Any]

JWT_AUTHN_FILTER = "envoy.filters.http.jwt_authn"
# Istio's jwt_authn config writes each verified payload under this key
# (payload_in_metadata); the RBAC metadata matchers read it there.
JWT_PAYLOAD_KEY = "payload"
# Envoy refuses a config whose regex compiles to more RE2 instructions than this
# (runtime re2.max_program_size.error_level, 100 by default).
RE2_MAX_PROGRAM_SIZE = 100
_UNIFORM_OVERHEAD = 4  # instructions RE2 adds to every program

# What Istio puts in the permission (the "to" side); everything else is a principal.
PERMISSION_ATTRIBUTES = frozenset(
    {
        Attribute.HOST,
        Attribute.METHOD,
        Attribute.PATH,
        Attribute.DESTINATION_PORT,
        Attribute.DESTINATION_IP,
        Attribute.SNI,
        Attribute.FILTER_METADATA,
    }
)

_SPIFFE = "spiffe://"
_RE2_SPECIAL = frozenset("\\.+*?()|[]{}^$")
# Envoy's HTTP_HEADER_NAME (non-strict) rule for HeaderMatcher.name.
_HEADER_NAME = re.compile(r":?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+")
# Envoy's uri_template literal (RFC 3986 pchar without '*'); an operator replaces a
# whole segment, every other segment must be one or more of these.
_TEMPLATE_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")
_NEVER_PRINCIPAL: JSON = {"not_id": {"any": True}}
_NEVER_PERMISSION: JSON = {"not_rule": {"any": True}}
# A string of any content (the engine's iss/sub of any value, empty included).
_ANY_STRING = "(?s).*"


class Untranslatable(ValueError):
    """The value cannot be matched by Envoy exactly as the engine matches it."""


def principal(clause: Clause) -> JSON:
    """The principal for a source field or a principal-side ``when`` condition."""
    build = _PRINCIPALS[clause.attribute]
    return _negate_principal(build(clause)) if clause.negated else build(clause)


def permission(clause: Clause) -> JSON:
    """The permission for an operation field or a permission-side ``when`` condition."""
    build = _PERMISSIONS[clause.attribute]
    if clause.negated:
        return {"not_rule": build(clause)}
    return build(clause)


# -- string matchers ------------------------------------------------------------


def _string(matcher: StringMatch, *, present: str = ".+", ignore_case: bool = False) -> JSON:
    """``envoy.type.matcher.v3.StringMatcher`` for one of Istio's string forms.

    ``present`` is the regex for ``*``: ``.+`` where the value cannot hold a newline
    (paths, headers, SNI), ``(?s).+`` where it can (JWT claims, metadata).
    """
    if matcher.kind is MatchKind.PRESENCE:
        return _regex(present)
    key = {MatchKind.EXACT: "exact", MatchKind.PREFIX: "prefix", MatchKind.SUFFIX: "suffix"}
    out: JSON = {key[matcher.kind]: matcher.value}
    if ignore_case:
        out["ignore_case"] = True
    return out


def _regex(pattern: str) -> JSON:
    # Each literal byte is one RE2 instruction and the constructs used here cost no
    # more than their own text, so the pattern's length bounds the program's size.
    size = _UNIFORM_OVERHEAD + len(pattern.encode("utf-8"))
    if size > RE2_MAX_PROGRAM_SIZE:
        raise Untranslatable(
            f"Envoy would need the regular expression {pattern!r}, longer than RE2's "
            f"program-size limit ({RE2_MAX_PROGRAM_SIZE}) allows; shorten the value"
        )
    return {"safe_regex": {"regex": pattern}}


def _literal(text: str) -> str:
    """``text`` as an RE2 regex matching exactly it."""
    out: list[str] = []
    for char in text:
        if char in _RE2_SPECIAL:
            out.append("\\" + char)
        elif char.isascii() and char.isprintable():
            out.append(char)
        else:
            out.append(f"\\x{{{ord(char):x}}}")  # control and non-ASCII: by code point
    return "".join(out)


def _literal_ascii_ci(text: str) -> str:
    """Like ``_literal`` but A-Z/a-z match either case (and nothing else does, unlike (?i))."""
    return "".join(
        f"[{c.upper()}{c.lower()}]" if c.isascii() and c.isalpha() else _literal(c) for c in text
    )


def _strings(clause: Clause) -> Sequence[StringMatch]:
    out = [m for m in clause.matchers if isinstance(m, StringMatch)]
    if len(out) != len(clause.matchers):
        raise AssertionError(f"{clause.field}: expected string values, got {clause.matchers}")
    return out


def _or_principals(ids: Sequence[JSON]) -> JSON:
    return {"or_ids": {"ids": list(ids)}}


def _or_permissions(rules: Sequence[JSON]) -> JSON:
    return {"or_rules": {"rules": list(rules)}}


def _negate_principal(inner: JSON) -> JSON:
    return {"not_id": inner}


# -- the peer certificate ---------------------------------------------------------


def _authenticated(name: JSON) -> JSON:
    return {"authenticated": {"principal_name": name}}


def _source_principal(clause: Clause) -> JSON:
    ids: list[JSON] = []
    for m in _strings(clause):
        if m.kind is MatchKind.EXACT:
            ids.append(_authenticated({"exact": _SPIFFE + m.value}))
        elif m.kind is MatchKind.PREFIX:
            ids.append(_authenticated({"prefix": _SPIFFE + m.value}))
        elif m.kind is MatchKind.SUFFIX:
            ids.append(_authenticated(_regex(_SPIFFE + "(?s:.*)" + _literal(m.value))))
        else:
            ids.append(_authenticated(_regex(_SPIFFE + "(?s:.+)")))
    return _or_principals(ids)


def _segment(m: StringMatch) -> str | None:
    """Regex for one ``/``-free segment of a SPIFFE ID; None if ``m`` can never match one."""
    if m.kind is MatchKind.PRESENCE:
        return "[^/]+"
    if "/" in m.value:
        return None
    if m.kind is MatchKind.EXACT:
        return _literal(m.value)
    if m.kind is MatchKind.PREFIX:
        return _literal(m.value) + "[^/]*"
    return "[^/]*" + _literal(m.value)


def _spiffe_id(trust_domain: str, namespace: str, account: str) -> JSON:
    # The engine's principal shape: spiffe://<td>/ns/<ns>/sa/<sa>, five segments.
    return _authenticated(_regex(_SPIFFE + trust_domain + "/ns/" + namespace + "/sa/" + account))


def _by_segment(place: Callable[[str], JSON]) -> Callable[[Clause], JSON]:
    def build(clause: Clause) -> JSON:
        ids = []
        for m in _strings(clause):
            segment = _segment(m)
            ids.append(_NEVER_PRINCIPAL if segment is None else place(segment))
        return _or_principals(ids)

    return build


def _service_account(clause: Clause) -> JSON:
    ids = []
    for m in _strings(clause):
        namespace, account = m.value.split("/")  # the loader allows only <ns>/<sa>
        ids.append(_spiffe_id("[^/]*", _literal(namespace), _literal(account)))
    return _or_principals(ids)


# -- addresses and ports ------------------------------------------------------------


def _cidr(matcher: Matcher) -> JSON:
    if not isinstance(matcher, CidrMatch):
        raise AssertionError(f"expected a CIDR, got {matcher}")
    network = matcher.network
    return {"address_prefix": str(network.network_address), "prefix_len": network.prefixlen}


def _addresses(key: str, ids: bool) -> Callable[[Clause], JSON]:
    def build(clause: Clause) -> JSON:
        items = [{key: _cidr(m)} for m in clause.matchers]
        return _or_principals(items) if ids else _or_permissions(items)

    return build


def _destination_port(clause: Clause) -> JSON:
    return _or_permissions([{"destination_port": int(m.value)} for m in _strings(clause)])


def _sni(clause: Clause) -> JSON:
    return _or_permissions([{"requested_server_name": _string(m)} for m in _strings(clause)])


# -- HTTP ----------------------------------------------------------------------------


def _header(name: str, match: JSON) -> JSON:
    if not _HEADER_NAME.fullmatch(name):
        raise Untranslatable(
            f"{name!r} is not an HTTP header name (letters, digits and !#$%&'*+-.^_|~`), "
            "so Envoy refuses to match it; fix the name"
        )
    return {"header": {"name": name, **match}}


def _request_header(clause: Clause) -> JSON:
    name = clause.key[0]
    return _or_principals([_header(name, {"string_match": _string(m)}) for m in _strings(clause)])


def _method(clause: Clause) -> JSON:
    rules = []
    for m in _strings(clause):
        # A method is never empty, so "present" is Istio's present_match.
        match = (
            {"present_match": True}
            if m.kind is MatchKind.PRESENCE
            else {"string_match": _string(m)}
        )
        rules.append(_header(":method", match))
    return _or_permissions(rules)


def _path(clause: Clause) -> JSON:
    rules = []
    for m in clause.matchers:
        if isinstance(m, PathTemplate):
            rules.append(_uri_template(m))
        elif isinstance(m, StringMatch):
            rules.append({"url_path": {"path": _string(m)}})
        else:
            raise AssertionError(f"{clause.field}: unexpected path matcher {m}")
    return _or_permissions(rules)


def _uri_template(template: PathTemplate) -> JSON:
    segments = template.template.split("/")[1:]
    for i, segment in enumerate(segments):
        trailing_slash = segment == "" and i == len(segments) - 1
        if segment in ("{*}", "{**}") or trailing_slash:
            continue
        if not _TEMPLATE_LITERAL.fullmatch(segment):
            raise Untranslatable(
                f"path template {template.template!r}: Envoy's uri_template matcher only takes "
                f"segments of a-z A-Z 0-9 - . _ ~ % ! $ & ' ( ) + , ; : @ =, not {segment!r}; "
                "percent-encode the characters or use a plain path"
            )
    # Istio's sanitizePathTemplate: {*} → *, {**} → **.
    envoy_template = template.template.replace("{**}", "**").replace("{*}", "*")
    return {
        "uri_template": {
            "name": "uri-template",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                "path_template": envoy_template,
            },
        }
    }


def _authority(match: JSON) -> JSON:
    return _header(":authority", match)


def _host_forms(m: StringMatch) -> list[JSON]:
    """``:authority`` matchers for the engine's host rule: the host as sent, or the host
    without a ``:<digits>`` port when the rest has no ``:`` or ends with ``]``.

    The value is already ASCII-lowercased; Envoy's ``ignore_case`` is ASCII-only too.
    """
    v = m.value
    if m.kind is MatchKind.PRESENCE:
        return [_authority({"string_match": _regex(".+")})]  # the port form is never shorter
    as_sent = _authority({"string_match": _string(m, ignore_case=True)})
    if m.kind is MatchKind.PREFIX:
        return [as_sent]  # a name starting with v makes the whole host start with v
    if m.kind is MatchKind.EXACT:
        if ":" not in v:
            # Exactly one ':' in the host, followed by digits only: the name is v.
            return [as_sent, _all_of(_authority_ci("prefix", v + ":"), _one_port("[^:]*"))]
        if v.endswith("]") and v.count("]") == 1:
            # [v6]:port: the only ']' ends v, then ':' and digits.
            return [as_sent, _all_of(_authority_ci("prefix", v + ":"), _one_port(r"[^\]]*\]"))]
        if v.endswith("]"):
            return [as_sent, _authority({"string_match": _regex(_literal_ascii_ci(v) + ":[0-9]+")})]
        return [as_sent]  # a name holding ':' (and no ']' at its end) has no port form
    # SUFFIX
    if v.endswith("]"):
        pattern = "(?s:.*)" + _literal_ascii_ci(v) + ":[0-9]+"
        return [as_sent, _authority({"string_match": _regex(pattern)})]
    if ":" not in v:
        # One ':' in the host; v right before it means the name ends with v.
        return [as_sent, _all_of(_authority_ci("contains", v + ":"), _one_port("[^:]*"))]
    return [as_sent]


def _authority_ci(kind: str, value: str) -> JSON:
    return _authority({"string_match": {kind: value, "ignore_case": True}})


def _one_port(name_pattern: str) -> JSON:
    return _authority({"string_match": _regex(name_pattern + ":[0-9]+")})


def _all_of(*rules: JSON) -> JSON:
    return {"and_rules": {"rules": list(rules)}}


def _host(clause: Clause) -> JSON:
    return _or_permissions([form for m in _strings(clause) for form in _host_forms(m)])


# -- the verified JWT (jwt_authn's metadata) ------------------------------------------


def _dynamic_metadata(matcher: JSON) -> JSON:
    # sourced_metadata (dynamic by default): Envoy 1.40 deprecates the bare ``metadata``
    # field istiod still emits, and warns at every load.
    return {"sourced_metadata": {"metadata_matcher": matcher}}


def _jwt_claim(path: Sequence[str], value: JSON) -> JSON:
    return _dynamic_metadata(
        {
            "filter": JWT_AUTHN_FILTER,
            "path": [{"key": key} for key in (JWT_PAYLOAD_KEY, *path)],
            "value": value,
        }
    )


def _iss_sub(iss: JSON, sub: JSON) -> JSON:
    return {
        "and_ids": {
            "ids": [
                _jwt_claim(("iss",), {"string_match": iss}),
                _jwt_claim(("sub",), {"string_match": sub}),
            ]
        }
    }


def _prefix_or_any(text: str) -> JSON:
    return {"prefix": text} if text else _regex(_ANY_STRING)


def _suffix_or_any(text: str) -> JSON:
    return {"suffix": text} if text else _regex(_ANY_STRING)


def _request_principal_forms(m: StringMatch) -> list[JSON]:
    """(iss, sub) pairs whose OR is exactly "``iss/sub`` matches ``m``".

    ``iss/sub`` starts with ``p`` when ``iss`` does, or when ``iss`` is the part of
    ``p`` before one of its ``/`` and ``sub`` starts with the rest; likewise for
    suffixes and exact values (one pair per ``/`` in the value).
    """
    v = m.value
    slashes = [i for i, c in enumerate(v) if c == "/"]
    if m.kind is MatchKind.PRESENCE:
        return [_iss_sub(_regex(_ANY_STRING), _regex(_ANY_STRING))]
    if m.kind is MatchKind.EXACT:
        return [_iss_sub({"exact": v[:i]}, {"exact": v[i + 1 :]}) for i in slashes]
    if m.kind is MatchKind.PREFIX:
        forms = [_iss_sub({"prefix": v}, _regex(_ANY_STRING))]
        forms += [_iss_sub({"exact": v[:i]}, _prefix_or_any(v[i + 1 :])) for i in slashes]
        return forms
    forms = [_iss_sub(_regex(_ANY_STRING), {"suffix": v})]
    forms += [_iss_sub(_suffix_or_any(v[:i]), {"exact": v[i + 1 :]}) for i in slashes]
    return forms


def _request_principal(clause: Clause) -> JSON:
    forms = [form for m in _strings(clause) for form in _request_principal_forms(m)]
    if not forms:
        return _NEVER_PRINCIPAL  # only exact values without '/': no iss/sub equals them
    return forms[0] if len(forms) == 1 else _or_principals(forms)


def _claim(path: Sequence[str]) -> Callable[[Clause], JSON]:
    def build(clause: Clause) -> JSON:
        values = [{"string_match": _string(m, present="(?s).+")} for m in _strings(clause)]
        one_of = values[0] if len(values) == 1 else {"or_match": {"value_matchers": values}}
        # A string claim, or a list of them with one matching (Istio's extended JWT matcher).
        either = {"or_match": {"value_matchers": [{"list_match": {"one_of": one_of}}, one_of]}}
        return _jwt_claim(path or clause.key, either)

    return build


# -- other filters' dynamic metadata -------------------------------------------------


def _filter_metadata(clause: Clause) -> JSON:
    filter_name, key = clause.key
    rules = []
    for m in clause.matchers:
        if isinstance(m, ListValueMatch):
            value: JSON = {
                "list_match": {"one_of": {"string_match": _string(m.element, present="(?s).+")}}
            }
        elif isinstance(m, StringMatch):
            value = {"string_match": _string(m, present="(?s).+")}
        else:
            raise AssertionError(f"{clause.field}: unexpected metadata matcher {m}")
        rules.append(
            _dynamic_metadata({"filter": filter_name, "path": [{"key": key}], "value": value})
        )
    return _or_permissions(rules)


_PRINCIPALS: dict[Attribute, Callable[[Clause], JSON]] = {
    Attribute.SOURCE_PRINCIPAL: _source_principal,
    Attribute.SOURCE_NAMESPACE: _by_segment(lambda ns: _spiffe_id("[^/]*", ns, "[^/]*")),
    Attribute.SOURCE_SERVICE_ACCOUNT: _service_account,
    Attribute.SOURCE_TRUST_DOMAIN: _by_segment(lambda td: _spiffe_id(td, "[^/]*", "[^/]*")),
    Attribute.SOURCE_IP: _addresses("direct_remote_ip", ids=True),
    Attribute.REMOTE_IP: _addresses("remote_ip", ids=True),
    Attribute.REQUEST_PRINCIPAL: _request_principal,
    Attribute.AUTH_AUDIENCES: _claim(("aud",)),
    Attribute.AUTH_PRESENTER: _claim(("azp",)),
    Attribute.AUTH_CLAIM: _claim(()),
    Attribute.HEADER: _request_header,
}
_PERMISSIONS: dict[Attribute, Callable[[Clause], JSON]] = {
    Attribute.HOST: _host,
    Attribute.METHOD: _method,
    Attribute.PATH: _path,
    Attribute.DESTINATION_PORT: _destination_port,
    Attribute.DESTINATION_IP: _addresses("destination_ip", ids=False),
    Attribute.SNI: _sni,
    Attribute.FILTER_METADATA: _filter_metadata,
}
