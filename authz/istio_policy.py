"""Compiled Istio AuthorizationPolicy: actions, matchers, rules, policies, the policy set.

Everything here is built once by ``authz.istio_loader`` and never changes; the
engine (``authz.istio_engine``) only reads it. Matchers are compiled at load time
(path templates to regexes, CIDRs to networks, principals expanded with trust-domain
aliases) so evaluation does no parsing of policy text.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import MappingProxyType

__all__ = [
    "HTTP_ONLY",
    "Action",
    "Attribute",
    "CidrMatch",
    "Clause",
    "CompiledPolicy",
    "ListValueMatch",
    "MatchKind",
    "Matcher",
    "PathTemplate",
    "PolicySet",
    "Rule",
    "StringMatch",
    "ascii_lower",
    "compile_path_template",
    "compile_string",
    "is_path_template",
]


class Action(StrEnum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class Attribute(Enum):
    """What a clause reads from the request view."""

    SOURCE_PRINCIPAL = "source.principal"
    SOURCE_NAMESPACE = "source.namespace"
    SOURCE_SERVICE_ACCOUNT = "source.serviceAccount"
    SOURCE_TRUST_DOMAIN = "source.trustDomain"
    SOURCE_IP = "source.ip"
    REMOTE_IP = "remote.ip"
    DESTINATION_IP = "destination.ip"
    DESTINATION_PORT = "destination.port"
    SNI = "connection.sni"
    FILTER_METADATA = "experimental.envoy.filters"
    REQUEST_PRINCIPAL = "request.auth.principal"
    AUTH_AUDIENCES = "request.auth.audiences"
    AUTH_PRESENTER = "request.auth.presenter"
    AUTH_CLAIM = "request.auth.claims"
    HEADER = "request.headers"
    HOST = "hosts"
    METHOD = "methods"
    PATH = "paths"


# Istio generates these only into the HTTP RBAC filter; on a TCP connection they do
# not exist (see authz.istio_engine for what a rule using them does there).
HTTP_ONLY: frozenset[Attribute] = frozenset(
    {
        Attribute.REQUEST_PRINCIPAL,
        Attribute.AUTH_AUDIENCES,
        Attribute.AUTH_PRESENTER,
        Attribute.AUTH_CLAIM,
        Attribute.HEADER,
        Attribute.HOST,
        Attribute.METHOD,
        Attribute.PATH,
    }
)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lowercase A-Z only, as DNS names compare and as Envoy's ``ignore_case`` does.

    ``str.lower`` would fold more (the Kelvin sign K to ``k``), so a host Envoy never
    matches would match here.
    """
    return text.translate(_ASCII_LOWER)


class MatchKind(Enum):
    EXACT = "exact"
    PREFIX = "prefix"
    SUFFIX = "suffix"
    PRESENCE = "presence"


@dataclass(slots=True, frozen=True)
class StringMatch:
    """Istio's string forms: ``exact``, ``prefix*``, ``*suffix``, ``*`` (present, non-empty)."""

    kind: MatchKind
    value: str
    ignore_case: bool = False

    def matches(self, candidate: str) -> bool:
        if self.kind is MatchKind.PRESENCE:
            return candidate != ""
        text = ascii_lower(candidate) if self.ignore_case else candidate
        if self.kind is MatchKind.EXACT:
            return text == self.value
        if self.kind is MatchKind.PREFIX:
            return text.startswith(self.value)
        return text.endswith(self.value)


@dataclass(slots=True, frozen=True)
class PathTemplate:
    """An Envoy URI template (``/api/{*}/items/{**}``) compiled to an anchored regex."""

    template: str
    regex: re.Pattern[str]

    def matches(self, candidate: str) -> bool:
        return self.regex.fullmatch(candidate) is not None


@dataclass(slots=True, frozen=True)
class CidrMatch:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    def matches(self, candidate: str) -> bool:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            return False
        return address in self.network


@dataclass(slots=True, frozen=True)
class ListValueMatch:
    """``[value]`` in an ``experimental.envoy.filters.*`` condition: the metadata value
    must be a list with an element matching ``element`` (a plain value matches a
    string metadata value instead), as Istio's envoy filter generator does."""

    element: StringMatch

    def matches(self, candidate: str) -> bool:
        return self.element.matches(candidate)


Matcher = StringMatch | PathTemplate | CidrMatch | ListValueMatch


def compile_string(value: str, *, ignore_case: bool = False) -> StringMatch:
    """Istio's rule: ``*`` alone is presence, a leading ``*`` a suffix, a trailing one a prefix.

    A ``*`` anywhere else is literal (Istio treats ``/a*b`` as an exact match too).
    """
    if value == "*":
        return StringMatch(MatchKind.PRESENCE, "")
    text = ascii_lower(value) if ignore_case else value
    if text.startswith("*"):
        return StringMatch(MatchKind.SUFFIX, text[1:], ignore_case)
    if text.endswith("*"):
        return StringMatch(MatchKind.PREFIX, text[:-1], ignore_case)
    return StringMatch(MatchKind.EXACT, text, ignore_case)


# Envoy's uri_template character classes: a {*} glob is one or more of these within
# one segment; {**} is zero or more of them or '/'.
_SEGMENT_CHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@="
_ONE_SEGMENT = f"[{_SEGMENT_CHARS}]+"
_ANY_SEGMENTS = f"[{_SEGMENT_CHARS}/]*"


def is_path_template(value: str) -> bool:
    return "{*}" in value or "{**}" in value


def compile_path_template(value: str) -> PathTemplate:
    """Compile an Istio path template; ValueError names what is wrong with it.

    Rules (Istio's Operation.paths docs): ``{*}`` matches one segment, ``{**}`` zero
    or more; an operator must be a whole segment; ``{**}`` must be the last
    operator; ``*``, ``{`` and ``}`` may not appear outside an operator.
    """
    if not value.startswith("/"):
        raise ValueError(f"path template {value!r} must start with '/'")
    parts: list[str] = []
    seen_any_segments = False
    for segment in value.split("/")[1:]:
        if segment in ("{*}", "{**}"):
            if seen_any_segments:
                raise ValueError(
                    f"path template {value!r}: {{**}} must be the last operator; "
                    "move it to the end or use {*} for one segment"
                )
            seen_any_segments = segment == "{**}"
            parts.append(_ONE_SEGMENT if segment == "{*}" else _ANY_SEGMENTS)
            continue
        if "{*}" in segment or "{**}" in segment:
            raise ValueError(
                f"path template {value!r}: the segment {segment!r} must contain only the "
                "operator ({*} or {**}), nothing else"
            )
        if any(c in segment for c in "*{}"):
            raise ValueError(
                f"path template {value!r}: '*', '{{' and '}}' may not appear outside a "
                "template operator; use {*} for one segment or {**} for the rest"
            )
        parts.append(re.escape(segment))
    return PathTemplate(value, re.compile("/" + "/".join(parts)))


@dataclass(slots=True, frozen=True)
class Clause:
    """One field of a source/operation, or one ``when`` condition.

    Values are ORed; a negated clause (the ``not*`` forms, ``notValues``) matches
    when none of its matchers does. ``key`` is the header name, the claim path, or
    (filter name, metadata key) for attributes that need one.
    """

    attribute: Attribute
    matchers: tuple[Matcher, ...]
    negated: bool
    field: str
    key: tuple[str, ...] = ()

    @property
    def http_only(self) -> bool:
        return self.attribute in HTTP_ONLY


@dataclass(slots=True, frozen=True)
class Rule:
    """A rule: ANY of ``sources`` and ANY of ``operations`` and ALL of ``conditions``.

    Each source/operation is a tuple of clauses that are ANDed; an empty ``sources``
    or ``operations`` tuple means the rule does not constrain it.
    """

    index: int
    sources: tuple[tuple[Clause, ...], ...] = ()
    operations: tuple[tuple[Clause, ...], ...] = ()
    conditions: tuple[Clause, ...] = ()

    def clauses(self) -> Iterable[Clause]:
        for source in self.sources:
            yield from source
        for operation in self.operations:
            yield from operation
        yield from self.conditions

    @property
    def http_only(self) -> bool:
        """True if any clause reads an attribute that exists only for HTTP."""
        return any(clause.http_only for clause in self.clauses())


@dataclass(slots=True, frozen=True)
class CompiledPolicy:
    """One AuthorizationPolicy, ready to evaluate.

    Scope: ``match_labels`` (selector) or ``target_services`` (targetRefs of kind
    Service); neither means every workload of the namespace (the mesh, for the root
    namespace).
    """

    namespace: str
    name: str
    action: Action
    rules: tuple[Rule, ...]
    file: str = ""
    document: int = 0
    provider: str | None = None
    dry_run: bool = False
    match_labels: tuple[tuple[str, str], ...] | None = None
    target_services: tuple[str, ...] | None = None
    rules_in_rbac_order: tuple[Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Envoy's RBAC filter tries policies in the byte order of their names
        # (ns[NS]-policy[NAME]-rule[i]): rule[10] comes before rule[2]. Evaluating in
        # that order makes the engine report the rule Envoy reports.
        ordered = tuple(sorted(self.rules, key=lambda rule: f"{rule.index}]"))
        object.__setattr__(self, "rules_in_rbac_order", ordered)

    @property
    def id(self) -> str:
        return f"{self.namespace}.{self.name}"

    def rule_id(self, index: int) -> str:
        return f"{self.id}[rules[{index}]]"

    @property
    def rbac_order(self) -> str:
        """The part of Istio's RBAC policy names shared by this policy's rules.

        Names of different policies first differ inside it (namespaces and names hold
        no brackets), so sorting policies by it sorts their rules as Envoy does.
        """
        return f"ns[{self.namespace}]-policy[{self.name}]-rule["

    def rbac_name(self, index: int) -> str:
        """Istio's name for rule ``index`` in Envoy's RBAC config: ns[NS]-policy[NAME]-rule[i]."""
        return f"{self.rbac_order}{index}]"

    def selects(self, namespace: str, labels: Mapping[str, str], service: str | None) -> bool:
        if self.match_labels is not None:
            return all(labels.get(k) == v for k, v in self.match_labels)
        if self.target_services is not None:
            # A Service is namespaced: a targetRef names a Service of the policy's namespace.
            return namespace == self.namespace and service in self.target_services
        return True


@dataclass(slots=True, frozen=True)
class _ScopeIndex:
    """One namespace's policies, keyed by what their scope names.

    A policy with a selector is filed under one of its ``matchLabels`` pairs and a
    targetRefs policy under its Services, so a request only looks at policies that
    could select its workload: cost follows the policies of that workload, not of the
    namespace.
    """

    unscoped: tuple[CompiledPolicy, ...]
    by_label: Mapping[tuple[str, str], tuple[CompiledPolicy, ...]]
    by_service: Mapping[str, tuple[CompiledPolicy, ...]]

    @classmethod
    def build(cls, ordered: Iterable[CompiledPolicy]) -> _ScopeIndex:
        """``ordered``: one namespace's policies, by name (evaluation order)."""
        unscoped: list[CompiledPolicy] = []
        by_label: dict[tuple[str, str], list[CompiledPolicy]] = {}
        by_service: dict[str, list[CompiledPolicy]] = {}
        for policy in ordered:
            if policy.match_labels:
                # Any one pair is enough to find it: every pair must match anyway.
                by_label.setdefault(min(policy.match_labels), []).append(policy)
            elif policy.target_services:
                for service in policy.target_services:
                    by_service.setdefault(service, []).append(policy)
            elif policy.target_services is None:
                unscoped.append(policy)
            # targetRefs naming no Service selects nothing: not indexed at all.
        return cls(
            unscoped=tuple(unscoped),
            by_label=MappingProxyType({k: tuple(v) for k, v in by_label.items()}),
            by_service=MappingProxyType({k: tuple(v) for k, v in by_service.items()}),
        )

    def candidates(
        self, labels: Mapping[str, str], service: str | None
    ) -> tuple[CompiledPolicy, ...]:
        found = list(self.unscoped)
        for pair in labels.items():
            found.extend(self.by_label.get(pair, ()))
        if service is not None:
            found.extend(self.by_service.get(service, ()))
        if len(found) == len(self.unscoped):
            return self.unscoped
        found = list({p.name: p for p in found}.values())
        # Names are unique within a namespace: sorting by name keeps the result
        # deterministic (the engine then orders by Envoy's RBAC names).
        found.sort(key=lambda p: p.name)
        return tuple(found)


_EMPTY_SCOPE = _ScopeIndex.build(())


@dataclass(slots=True, frozen=True)
class PolicySet:
    """All loaded policies, immutable, indexed by namespace and then by selector.

    Evaluation reads only the root namespace's and the workload namespace's policies
    that could select the workload, so its cost does not grow with policies written
    for other namespaces or other workloads.
    """

    policies: tuple[CompiledPolicy, ...]
    root_namespace: str = "istio-system"
    _by_namespace: Mapping[str, tuple[CompiledPolicy, ...]] = field(
        init=False, repr=False, compare=False
    )
    _scopes: Mapping[str, _ScopeIndex] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grouped: dict[str, list[CompiledPolicy]] = {}
        seen: set[tuple[str, str]] = set()
        for policy in self.policies:
            if (policy.namespace, policy.name) in seen:
                raise ValueError(f"policy {policy.id} appears twice in the policy set")
            seen.add((policy.namespace, policy.name))
            grouped.setdefault(policy.namespace, []).append(policy)
        # Sorted by name so candidates come in a deterministic order.
        index = {ns: tuple(sorted(items, key=lambda p: p.name)) for ns, items in grouped.items()}
        object.__setattr__(self, "_by_namespace", MappingProxyType(index))
        scopes = {ns: _ScopeIndex.build(items) for ns, items in index.items()}
        object.__setattr__(self, "_scopes", MappingProxyType(scopes))

    def in_namespace(self, namespace: str) -> tuple[CompiledPolicy, ...]:
        return self._by_namespace.get(namespace, ())

    def applicable(
        self,
        workload_namespace: str,
        labels: Mapping[str, str] | None = None,
        service: str | None = None,
    ) -> tuple[CompiledPolicy, ...]:
        """The policies that apply to the workload, in Envoy's RBAC order (``rbac_order``)."""
        labels = labels or {}
        selected = [
            p
            for p in self.candidates(workload_namespace, labels, service)
            if p.selects(workload_namespace, labels, service)
        ]
        selected.sort(key=lambda p: p.rbac_order)
        return tuple(selected)

    def candidates(
        self,
        workload_namespace: str,
        labels: Mapping[str, str] | None = None,
        service: str | None = None,
    ) -> tuple[CompiledPolicy, ...]:
        """Policies that may select the workload: the root namespace's first.

        A superset of what applies (``CompiledPolicy.selects`` still decides), in
        evaluation order.
        """
        labels = labels or {}
        root = self._scopes.get(self.root_namespace, _EMPTY_SCOPE).candidates(labels, service)
        if workload_namespace == self.root_namespace:
            return root
        own = self._scopes.get(workload_namespace, _EMPTY_SCOPE).candidates(labels, service)
        return root + own
