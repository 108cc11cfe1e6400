"""The request test file format: a request as Envoy would send it, and the decision expected.

A test file (``tests/*.yaml`` in a policy repository) holds one YAML document::

    defaults:                       # optional; merged (key by key) into every request
      request:
        destination: {namespace: default, labels: {app: reviews}, service: reviews}
    tests:
    - name: frontend reads reviews
      request:
        principal: spiffe://example.org/ns/default/sa/frontend   # omit: no mTLS peer
        method: GET                 # default GET
        path: /reviews/1            # required; the query string included, as Envoy sends it
        headers: {x-user-agent: curl}
        body: '{"stars": 5}'        # optional request body (Envoy sends up to 8 KiB)
        bearer: {sub: alice}        # optional: claims of an unsigned JWT put in
                                    # `authorization: Bearer …` (policies only decode it)
      expect:
        allowed: true               # required
        policy: default.reviews-viewer[rules[0]]   # the rule that decided; null: none
        reason: allowed_by_policy
        engine: istio               # the engine that decided: istio, rego or error
        upstream_headers: {x-user: alice}          # added to the request on allow
        removed_headers: [authorization]           # removed from it on allow
        response_headers: {www-authenticate: Bearer}  # sent to the client
        status: 403                 # denied only: the HTTP status the client gets
        body: RBAC: access denied   # denied only
        dry_run: {deny: denied, deny_policy: default.x[rules[0]]}

Request fields: ``principal`` (a SPIFFE ID, Envoy's ``source.principal``), ``source_ip``
(10.0.0.2), ``source_port`` (45000), ``method``, ``path``, ``host`` (default: the
destination service, else its ``app`` label, else ``localhost``), ``headers``,
``body``, ``bearer``, and ``destination``: ``namespace``, ``labels``, ``service``
(the ext_authz ``context_extensions`` the sidecar sets), ``principal``, ``ip``
(10.0.0.10), ``port`` (8080).

Every expectation is optional except ``allowed``; a header expected ``null`` must be
absent. ``dry_run`` keys: ``allow`` / ``deny``, Istio's shadow engine results
(``allowed`` / ``denied``), and ``allow_policy`` / ``deny_policy`` its effective policy
ids; ``rego`` / ``rego_reason``, a Rego decision that was not enforced, and
``rego_shadow`` / ``rego_shadow_reason``, the decision with the dry-run (staged)
packages when it differs from the enforced one. Any other key is compared with the
decision record's ``dry_run`` entry of that name; ``null`` expects the key absent, and
``dry_run: null`` expects no dry-run result at all.

A file that does not follow this format is refused as a whole; every problem is
reported as ``file:line: field: message``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz.check_response import (
    DRY_RUN_ALLOW_PREFIX,
    DRY_RUN_DENY_PREFIX,
    REGO_DRY_RUN_PREFIX,
)
from authz.errors import PolicyIssue, PolicyLoadError

__all__ = [
    "DRY_RUN_KEYS",
    "Destination",
    "Expectation",
    "RequestTest",
    "RequestUnderTest",
    "load_request_test",
    "load_request_tests",
]

DRY_RUN_KEYS: Mapping[str, str] = {
    "allow": DRY_RUN_ALLOW_PREFIX + "shadow_engine_result",
    "allow_policy": DRY_RUN_ALLOW_PREFIX + "shadow_effective_policy_id",
    "deny": DRY_RUN_DENY_PREFIX + "shadow_engine_result",
    "deny_policy": DRY_RUN_DENY_PREFIX + "shadow_effective_policy_id",
    "rego": REGO_DRY_RUN_PREFIX + "result",
    "rego_reason": REGO_DRY_RUN_PREFIX + "reason",
    "rego_shadow": REGO_DRY_RUN_PREFIX + "shadow_result",
    "rego_shadow_reason": REGO_DRY_RUN_PREFIX + "shadow_reason",
}
_VERDICT_KEYS = frozenset({"allow", "deny", "rego", "rego_shadow"})
_ENGINES = ("istio", "rego", "error")  # DecisionRecord.engine
_SPIFFE = "spiffe://"
_FILE_KEYS = ("defaults", "tests")
_DEFAULT_KEYS = ("request",)
_TEST_KEYS = ("name", "request", "expect")
_REQUEST_KEYS = (
    "principal",
    "source_ip",
    "source_port",
    "method",
    "path",
    "host",
    "headers",
    "body",
    "bearer",
    "destination",
)
_DESTINATION_KEYS = ("namespace", "labels", "service", "principal", "ip", "port")
_EXPECT_KEYS = (
    "allowed",
    "status",
    "reason",
    "engine",
    "policy",
    "body",
    "upstream_headers",
    "removed_headers",
    "response_headers",
    "dry_run",
)

Path_ = tuple[str | int, ...]  # a place in the file: ("tests", 0, "request", "path")


# -- the format --------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Destination:
    """The protected workload, as its sidecar describes it to ext_authz."""

    namespace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    service: str | None = None
    principal: str | None = None
    ip: str = "10.0.0.10"
    port: int = 8080


@dataclass(slots=True, frozen=True)
class RequestUnderTest:
    path: str
    method: str = "GET"
    principal: str | None = None  # spiffe://…; None: a peer without a client certificate
    source_ip: str = "10.0.0.2"
    source_port: int = 45000
    host: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)  # names lowercased
    body: str | None = None
    bearer: Mapping[str, Any] | None = None
    destination: Destination = field(default_factory=Destination)

    @property
    def authority(self) -> str:
        if self.host is not None:
            return self.host
        return self.destination.service or self.destination.labels.get("app") or "localhost"


@dataclass(slots=True, frozen=True)
class Expectation:
    """What the decision must be. ``expects_*`` tell "expect null" from "not checked"."""

    allowed: bool
    status: int | None = None
    reason: str | None = None
    engine: str | None = None
    policy: str | None = None
    expects_policy: bool = False
    body: str | None = None
    upstream_headers: Mapping[str, str | None] = field(default_factory=dict)
    removed_headers: tuple[str, ...] | None = None
    response_headers: Mapping[str, str | None] = field(default_factory=dict)
    dry_run: Mapping[str, str | None] | None = None
    expects_dry_run: bool = False


@dataclass(slots=True, frozen=True)
class RequestTest:
    name: str
    file: str
    line: int
    request: RequestUnderTest
    expect: Expectation | None  # None only in a file given to `policy eval`


def load_request_tests(directory: Path) -> list[RequestTest]:
    """Every test of every ``*.yaml`` / ``*.yml`` file in ``directory`` (not recursive).

    Raises PolicyLoadError listing every problem of every file; no test is returned then.
    """
    if not directory.is_dir():
        return []
    tests: list[RequestTest] = []
    issues: list[PolicyIssue] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.suffix not in (".yaml", ".yml"):
            continue
        reader = _Reader.open(path, issues)
        if reader is not None:
            tests.extend(reader.test_file())
    if issues:
        # A bad default is found again in every test that uses it, at the same place.
        raise PolicyLoadError(list(dict.fromkeys(issues)))
    return tests


def load_request_test(path: Path) -> RequestTest:
    """One test entry (``name`` optional, ``expect`` optional), for ``policy eval``."""
    issues: list[PolicyIssue] = []
    reader = _Reader.open(path, issues)
    test = reader.single() if reader is not None else None
    if issues or test is None:
        raise PolicyLoadError(issues)
    return test


class _Reader:
    """Validates one file into tests, appending each problem, with its line, to ``issues``."""

    def __init__(self, file: str, node: yaml.Node, value: Any, issues: list[PolicyIssue]):
        self.file = file
        self._node = node
        self._value = value
        self._issues = issues

    @classmethod
    def open(cls, path: Path, issues: list[PolicyIssue]) -> _Reader | None:
        file = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(PolicyIssue(file, 0, "", f"cannot be read: {exc}"))
            return None
        try:
            nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
            values = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            issues.append(_yaml_issue(file, exc))
            return None
        if len(nodes) != 1 or nodes[0] is None:
            issues.append(
                PolicyIssue(file, 0, "", f"must hold one YAML document, not {len(nodes)}", 1)
            )
            return None
        return cls(file, nodes[0], values[0], issues)

    # -- plumbing ------------------------------------------------------------------------

    def _line(self, path: Path_) -> int:
        node: yaml.Node = self._node
        for part in path:
            child: yaml.Node | None = None
            if isinstance(node, yaml.MappingNode):
                child = next((v for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                child = node.value[part] if part < len(node.value) else None
            if child is None:
                break  # a missing key is reported on the line of its parent
            node = child
        return int(node.start_mark.line) + 1

    def error(self, path: Path_, message: str) -> None:
        self._issues.append(PolicyIssue(self.file, 0, _dotted(path), message, self._line(path)))

    def _mapping(self, value: Any, path: Path_, allowed: Sequence[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping, not {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error(
                    (*path, str(key)), f"unknown field; expected one of: {', '.join(allowed)}"
                )
        return value

    def _string(self, value: Any, path: Path_) -> str | None:
        if not isinstance(value, str) or not value:
            what = "an empty string" if value == "" else _kind(value)
            self.error(path, f"must be a non-empty string, not {what} (quote it)")
            return None
        return value

    def _port(self, value: Any, path: Path_) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.error(path, f"must be a port number from 1 to 65535, not {value!r}")
            return None
        return value

    def _spiffe_id(self, value: Any, path: Path_) -> str | None:
        text = self._string(value, path)
        if text is None:
            return None
        if not text.startswith(_SPIFFE) or "/" not in text[len(_SPIFFE) :]:
            self.error(
                path,
                f"{text!r} is not a SPIFFE ID; write the certificate's URI SAN, e.g. "
                "spiffe://example.org/ns/default/sa/frontend",
            )
            return None
        return text

    def _headers(self, value: Any, path: Path_, *, nullable: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if not isinstance(value, dict):
            self.error(path, f"must be a mapping of header names to values, not {_kind(value)}")
            return out
        for name, item in value.items():
            where = (*path, str(name))
            if not isinstance(name, str) or not name or name.startswith(":"):
                self.error(where, "must be a header name (pseudo-headers are set from the request)")
            elif item is None and nullable:
                out[name.lower()] = None
            elif not isinstance(item, str):
                self.error(where, f"must be a string, not {_kind(item)} (quote it)")
            elif name.lower() in out:
                self.error(where, "is given twice (header names are case-insensitive)")
            else:
                out[name.lower()] = item
        return out

    # -- the document --------------------------------------------------------------------

    def test_file(self) -> list[RequestTest]:
        top = self._mapping(self._value, (), _FILE_KEYS)
        if top is None:
            return []
        defaults = self._defaults(top)
        raw_tests = top.get("tests")
        if not isinstance(raw_tests, list) or not raw_tests:
            self.error(("tests",), f"must be a non-empty list of tests, not {_kind(raw_tests)}")
            return []
        tests: list[RequestTest] = []
        names: dict[str, int] = {}
        for i, raw in enumerate(raw_tests):
            test = self._test(raw, ("tests", i), defaults, named=True, expected=True)
            if test is None:
                continue
            if test.name in names:
                self.error(
                    ("tests", i, "name"),
                    f"{test.name!r} is also the name of tests[{names[test.name]}]",
                )
                continue
            names[test.name] = i
            tests.append(test)
        return tests

    def single(self) -> RequestTest | None:
        return self._test(self._value, (), {}, named=False, expected=False)

    def _defaults(self, top: Mapping[str, Any]) -> dict[str, Any]:
        if "defaults" not in top:
            return {}
        defaults = self._mapping(top["defaults"], ("defaults",), _DEFAULT_KEYS)
        if defaults is None or "request" not in defaults:
            return {}
        request = self._mapping(defaults["request"], ("defaults", "request"), _REQUEST_KEYS)
        if request is None:
            return {}
        # Checked on its own, so a mistake in a default is reported once, at its place.
        if "path" not in request:
            self._request({**request, "path": "/"}, ("defaults", "request"))
        else:
            self._request(request, ("defaults", "request"))
        return request

    def _test(
        self, raw: Any, path: Path_, defaults: Mapping[str, Any], *, named: bool, expected: bool
    ) -> RequestTest | None:
        mapping = self._mapping(raw, path, _TEST_KEYS)
        if mapping is None:
            return None
        line = self._line(path)
        errors = len(self._issues)
        name = ""
        if "name" in mapping or named:
            name = self._string(mapping.get("name"), (*path, "name")) or ""
        request: RequestUnderTest | None = None
        if "request" not in mapping:
            self.error((*path, "request"), "is required")
        else:
            own = self._mapping(mapping["request"], (*path, "request"), _REQUEST_KEYS)
            if own is not None:
                merged = {**defaults, **own}
                if "path" not in merged:
                    self.error((*path, "request", "path"), "is required")
                else:
                    request = self._request(merged, (*path, "request"), own=own)
        expect: Expectation | None = None
        if "expect" in mapping:
            expect = self._expect(mapping["expect"], (*path, "expect"))
        elif expected:
            self.error((*path, "expect"), "is required: what decision is this test about?")
        if request is None or len(self._issues) > errors:
            return None
        return RequestTest(name or Path(self.file).stem, self.file, line, request, expect)

    def _request(
        self, raw: Mapping[str, Any], path: Path_, *, own: Mapping[str, Any] | None = None
    ) -> RequestUnderTest | None:
        def at(key: str) -> Path_:
            # Values taken from `defaults` were checked (and reported) at their own place.
            return (*path, key) if own is None or key in own else ("defaults", "request", key)

        errors = len(self._issues)
        principal = None
        if raw.get("principal") is not None:
            principal = self._spiffe_id(raw["principal"], at("principal"))
        method = self._string(raw.get("method", "GET"), at("method")) or "GET"
        if method != method.upper():
            self.error(at("method"), f"{method!r} must be upper case, as clients send it")
        request_path = self._string(raw.get("path"), at("path")) or "/"
        if not request_path.startswith("/"):
            self.error(at("path"), f"{request_path!r} must start with /")
        host = self._string(raw["host"], at("host")) if "host" in raw else None
        headers = self._headers(raw.get("headers") or {}, at("headers"), nullable=False)
        body = None
        if "body" in raw:
            if isinstance(raw["body"], str):
                body = raw["body"]
            else:
                self.error(at("body"), f"must be a string, not {_kind(raw['body'])} (quote it)")
        bearer = self._bearer(raw, at("bearer"), headers) if "bearer" in raw else None
        destination = self._destination(raw.get("destination") or {}, at("destination"))
        source_ip = self._string(raw.get("source_ip", "10.0.0.2"), at("source_ip"))
        source_port = self._port(raw.get("source_port", 45000), at("source_port"))
        if len(self._issues) > errors:
            return None
        return RequestUnderTest(
            path=request_path,
            method=method,
            principal=principal,
            source_ip=source_ip or "",
            source_port=source_port or 0,
            host=host,
            headers=headers,
            body=body,
            bearer=bearer,
            destination=destination,
        )

    def _bearer(
        self, raw: Mapping[str, Any], path: Path_, headers: Mapping[str, str]
    ) -> dict[str, Any] | None:
        claims = raw["bearer"]
        if not isinstance(claims, dict):
            self.error(path, f"must be a mapping of JWT claims, not {_kind(claims)}")
            return None
        if "authorization" in headers:
            self.error(path, "cannot be used with headers.authorization; give one of them")
            return None
        try:
            json.dumps(claims)
        except (TypeError, ValueError) as exc:
            self.error(path, f"claims must be JSON values (quote dates): {exc}")
            return None
        return claims

    def _destination(self, raw: Any, path: Path_) -> Destination:
        mapping = self._mapping(raw, path, _DESTINATION_KEYS)
        if mapping is None:
            return Destination()
        namespace = service = principal = None
        if "namespace" in mapping:
            namespace = self._string(mapping["namespace"], (*path, "namespace"))
        if "service" in mapping:
            service = self._string(mapping["service"], (*path, "service"))
        if "principal" in mapping:
            principal = self._spiffe_id(mapping["principal"], (*path, "principal"))
        labels: dict[str, str] = {}
        raw_labels = mapping.get("labels") or {}
        if not isinstance(raw_labels, dict):
            self.error((*path, "labels"), f"must be a mapping, not {_kind(raw_labels)}")
        for key, value in dict(raw_labels).items() if isinstance(raw_labels, dict) else ():
            where = (*path, "labels", str(key))
            if not isinstance(value, str) or not isinstance(key, str):
                self.error(where, f"must be a string, not {_kind(value)} (quote it)")
            elif any(c in key + value for c in ",=") or not key:
                self.error(where, "labels are sent as k=v,k2=v2: no ',' or '=' in a label")
            else:
                labels[key] = value
        ip = self._string(mapping.get("ip", "10.0.0.10"), (*path, "ip")) or ""
        port = self._port(mapping.get("port", 8080), (*path, "port")) or 0
        return Destination(namespace, labels, service, principal, ip, port)

    def _expect(self, raw: Any, path: Path_) -> Expectation | None:
        mapping = self._mapping(raw, path, _EXPECT_KEYS)
        if mapping is None:
            return None
        errors = len(self._issues)
        allowed = mapping.get("allowed")
        if not isinstance(allowed, bool):
            self.error((*path, "allowed"), f"is required: true or false, not {_kind(allowed)}")
            return None
        status = None
        if "status" in mapping:
            status = mapping["status"]
            if allowed:
                self.error((*path, "status"), "applies to denied requests (allowed: false)")
            elif isinstance(status, bool) or not isinstance(status, int):
                self.error((*path, "status"), f"must be an HTTP status code, not {status!r}")
        body = None
        if "body" in mapping:
            body = mapping["body"]
            if allowed:
                self.error((*path, "body"), "applies to denied requests (allowed: false)")
            elif not isinstance(body, str):
                self.error((*path, "body"), f"must be a string, not {_kind(body)} (quote it)")
        reason = self._string(mapping["reason"], (*path, "reason")) if "reason" in mapping else None
        engine = self._string(mapping["engine"], (*path, "engine")) if "engine" in mapping else None
        if engine is not None and engine not in _ENGINES:
            self.error((*path, "engine"), f"must be one of {', '.join(_ENGINES)}, not {engine!r}")
        policy = None
        if mapping.get("policy") is not None:
            policy = self._string(mapping["policy"], (*path, "policy"))
        upstream: dict[str, Any] = {}
        if "upstream_headers" in mapping:
            if not allowed:
                self.error(
                    (*path, "upstream_headers"), "applies to allowed requests (allowed: true)"
                )
            upstream = self._headers(
                mapping["upstream_headers"], (*path, "upstream_headers"), nullable=True
            )
        removed = None
        if "removed_headers" in mapping:
            removed = self._removed(mapping["removed_headers"], (*path, "removed_headers"))
            if not allowed:
                self.error(
                    (*path, "removed_headers"), "applies to allowed requests (allowed: true)"
                )
        response = self._headers(
            mapping.get("response_headers") or {}, (*path, "response_headers"), nullable=True
        )
        dry_run = self._dry_run(mapping.get("dry_run"), (*path, "dry_run"))
        if len(self._issues) > errors:
            return None
        return Expectation(
            allowed=allowed,
            status=status,
            reason=reason,
            engine=engine,
            policy=policy,
            expects_policy="policy" in mapping,
            body=body,
            upstream_headers=upstream,
            removed_headers=removed,
            response_headers=response,
            dry_run=dry_run,
            expects_dry_run="dry_run" in mapping,
        )

    def _removed(self, raw: Any, path: Path_) -> tuple[str, ...] | None:
        if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
            self.error(path, f"must be a list of header names, not {_kind(raw)}")
            return None
        return tuple(sorted(n.lower() for n in raw))

    def _dry_run(self, raw: Any, path: Path_) -> dict[str, str | None] | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            self.error(path, f"must be a mapping (or null for none), not {_kind(raw)}")
            return None
        out: dict[str, str | None] = {}
        for key, value in raw.items():
            where = (*path, str(key))
            if value is not None and not isinstance(value, str):
                self.error(where, f"must be a string or null, not {_kind(value)}")
            elif key in _VERDICT_KEYS and value not in ("allowed", "denied", None):
                self.error(where, f"must be allowed or denied, not {value!r}")
            else:
                out[DRY_RUN_KEYS.get(str(key), str(key))] = value
        return out


def _yaml_issue(file: str, exc: yaml.YAMLError) -> PolicyIssue:
    # PyYAML's own text quotes the document twice over several lines; the problem and
    # its column say the same in one.
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        what = f"{exc.context}: {exc.problem}" if exc.context else str(exc.problem)
        message = f"is not valid YAML: {what} (column {mark.column + 1})"
        return PolicyIssue(file, 0, "", message, mark.line + 1)
    return PolicyIssue(file, 0, "", f"is not valid YAML: {exc}")


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"
