"""Warnings for AuthorizationPolicies that load but do not do what they appear to do.

``meshward policy lint`` prints these after the load errors. The workloads, Services
and ports of the mesh are unknown here, so every check is one the policies alone
make certain: a value that can never match, a rule that matches everything, a policy
another one makes useless. Nothing is flagged on a guess.

The checks read the compiled set (what the engine will actually do) and, for the
findings that point at one value of a list, the YAML the set was loaded from (the
compiled form keeps no value positions, and drops empty lists altogether).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import yaml

from authz.errors import PolicyIssue
from authz.istio_loader import CLUSTER_LOCAL
from authz.istio_policy import (
    Action,
    Attribute,
    Clause,
    CompiledPolicy,
    PolicySet,
    Rule,
    StringMatch,
)

__all__ = ["NON_HTTP_PORTS", "LintFinding", "Severity", "lint"]

# Ports whose protocol is never HTTP. A rule naming only these can only be checked on
# a TCP connection, where the engine drops HTTP-only fields (authz.istio_engine).
NON_HTTP_PORTS: Mapping[int, str] = {
    22: "SSH",
    25: "SMTP",
    53: "DNS",
    389: "LDAP",
    636: "LDAPS",
    1433: "SQL Server",
    1521: "Oracle",
    1883: "MQTT",
    2181: "ZooKeeper",
    3306: "MySQL",
    4222: "NATS",
    5432: "PostgreSQL",
    5672: "AMQP",
    6379: "Redis",
    9042: "Cassandra",
    9092: "Kafka",
    11211: "memcached",
    27017: "MongoDB",
}
_HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_SPIFFE_SCHEME = "spiffe://"
_MESH = "every workload in the mesh"
_PATH_TOKEN = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"


@dataclass(slots=True, frozen=True)
class LintFinding:
    """A :class:`PolicyIssue` with a severity: load errors and lint warnings in one list."""

    file: str
    document: int
    field: str
    message: str
    severity: Severity = Severity.WARNING

    @classmethod
    def from_issue(cls, issue: PolicyIssue) -> LintFinding:
        return cls(issue.file, issue.document, issue.field, issue.message, Severity.ERROR)

    def as_dict(self) -> dict[str, str | int]:
        return {
            "file": self.file,
            "document": self.document,
            "field": self.field,
            "message": self.message,
            "severity": str(self.severity),
        }

    def __str__(self) -> str:
        where = f"{self.file}[{self.document}]"
        if self.field:
            where = f"{where} {self.field}"
        return f"{self.severity}: {where}: {self.message}"


def lint(
    policies: PolicySet,
    *,
    trust_domain: str,
    trust_domain_aliases: Iterable[str] = (),
    texts: Mapping[str, str],
) -> list[LintFinding]:
    """Warnings for a loaded policy set, ordered by file and document.

    ``texts`` maps each policy file to the YAML it was loaded from; the value-level
    checks are skipped for a file missing from it or no longer matching the set.
    """
    domains = (trust_domain, *(a for a in trust_domain_aliases if a != trust_domain))
    documents = _documents(texts)
    findings: list[LintFinding] = []
    for policy in policies.policies:
        raw = documents.get((policy.file, policy.document))
        findings.extend(_policy_findings(policy, raw, domains, policies.root_namespace))
    findings.extend(_shadowed_allows(policies))
    return sorted(findings, key=lambda f: (f.file, f.document))


def _documents(texts: Mapping[str, str]) -> dict[tuple[str, int], Any]:
    out: dict[tuple[str, int], Any] = {}
    for file, text in texts.items():
        try:
            for index, document in enumerate(yaml.safe_load_all(text)):
                out[file, index] = document
        except yaml.YAMLError:
            continue  # changed since it was loaded; the other checks still run
    return out


def _policy_findings(
    policy: CompiledPolicy, raw: Any, domains: tuple[str, ...], root: str
) -> Iterator[LintFinding]:
    def at(field: str, message: str) -> LintFinding:
        return LintFinding(policy.file, policy.document, field, message)

    scope = _scope(policy, root)
    if policy.action is Action.ALLOW and not policy.dry_run:
        if not policy.rules:
            yield at(
                "spec.rules",
                f"ALLOW policy {policy.namespace}/{policy.name} has no rules, so it matches no "
                f"request: {scope} now denies every request that no other ALLOW policy "
                "allows; add rules (rules: [{}] allows everything), or ignore this if "
                "deny-by-default (Istio's allow-nothing policy) is the intent",
            )
        elif scope == _MESH:
            yield at(
                "spec",
                f"ALLOW policy {policy.namespace}/{policy.name} is in the root namespace with "
                "no selector or targetRefs, so it applies to every workload in the mesh: "
                "every workload now denies any request that no ALLOW policy allows; add a "
                "selector or targetRefs, or move it to the namespace it is meant for",
            )
    for rule in policy.rules:
        for field, message in _http_only_on_tcp(policy, rule):
            yield at(field, message)
        for clause in rule.clauses():
            values = _resolve(raw, clause.field)
            if not isinstance(values, list):
                continue
            for k, value in enumerate(values):
                if isinstance(value, str) and (problem := _value_problem(clause, value, domains)):
                    yield at(f"{clause.field}[{k}]", problem)


def _scope(policy: CompiledPolicy, root: str) -> str:
    # An empty matchLabels selects every workload, like no selector at all.
    if policy.match_labels or policy.target_services:
        return "every workload it selects"
    if policy.namespace == root:
        return _MESH
    return f"every workload in namespace {policy.namespace}"


def _http_only_on_tcp(policy: CompiledPolicy, rule: Rule) -> Iterator[tuple[str, str]]:
    """HTTP-only fields in a rule that names only non-HTTP ports.

    Without knowing the mesh's port protocols this is the one case where the rule
    certainly meets TCP connections, on which the engine drops an ALLOW rule with an
    HTTP-only field and ignores the HTTP-only fields of a DENY rule.
    """
    if policy.action not in (Action.ALLOW, Action.DENY):
        return
    http = [c for c in rule.clauses() if c.http_only]
    ports = _tcp_ports(rule)
    if not http or not ports:
        return
    names = ", ".join(dict.fromkeys(_clause_name(c) for c in http))
    noun = "port" if len(ports) == 1 else "ports"
    port_text = f"{noun} " + ", ".join(f"{p} ({NON_HTTP_PORTS[p]})" for p in ports)
    if policy.action is Action.ALLOW:
        message = (
            f"ALLOW rule with HTTP-only fields ({names}): never matches on TCP connections, "
            f"so it never allows the TCP {port_text} it names; put the TCP {noun} in a rule "
            "without HTTP-only fields"
        )
    else:
        message = (
            f"DENY rule with HTTP-only fields ({names}): on a TCP connection Istio ignores "
            "these fields, so this DENY matches more than it looks: it denies every "
            f"connection to TCP {port_text} that the rest of the rule matches; remove the "
            f"HTTP-only fields or the TCP {noun}"
        )
    yield http[0].field, message


def _tcp_ports(rule: Rule) -> list[int]:
    ports: set[int] = set()
    for clause in rule.clauses():
        if clause.attribute is not Attribute.DESTINATION_PORT or clause.negated:
            continue
        named = {int(m.value) for m in clause.matchers if isinstance(m, StringMatch)}
        if named and all(p in NON_HTTP_PORTS for p in named):
            ports |= named
    return sorted(ports)


def _clause_name(clause: Clause) -> str:
    if ".when[" not in clause.field:
        return clause.field.rsplit(".", 1)[-1]
    if clause.attribute in (Attribute.HEADER, Attribute.AUTH_CLAIM):
        return str(clause.attribute.value) + "".join(f"[{k}]" for k in clause.key)
    return str(clause.attribute.value)


def _value_problem(clause: Clause, value: str, domains: tuple[str, ...]) -> str | None:
    """Why one policy value can never match, and the fix; None if it can."""
    a = clause.attribute
    reason: str | None = None
    fix = ""
    if a in (Attribute.SOURCE_PRINCIPAL, Attribute.SOURCE_TRUST_DOMAIN):
        domain = _literal_trust_domain(a, value)
        if a is Attribute.SOURCE_PRINCIPAL and value.startswith(_SPIFFE_SCHEME):
            reason = f"principal {value!r} starts with 'spiffe://', which principals never do"
            fix = f"write {value[len(_SPIFFE_SCHEME) :]!r}"
        elif (
            domain is not None
            and domain not in domains
            and not (a is Attribute.SOURCE_PRINCIPAL and domain == CLUSTER_LOCAL)
        ):
            named = (
                f"principal {value!r} is in trust domain {domain!r}, which is"
                if a is Attribute.SOURCE_PRINCIPAL
                else f"trust domain {value!r} is"
            )
            reason = (
                f"{named} neither the trust domain {domains[0]!r} nor one of "
                "authz.trust_domain_aliases"
            )
            if domain == CLUSTER_LOCAL:
                reason += " (cluster.local names the local trust domain in principals only)"
            fix = "correct the trust domain or add it to authz.trust_domain_aliases"
    elif a is Attribute.PATH:
        if not value.startswith(("/", "*")):
            reason = f"path {value!r} does not start with '/' as every request path does"
            fix = f"write {'/' + value!r}"
    elif a is Attribute.METHOD:
        upper = value.upper()
        if value != upper and upper in _HTTP_METHODS:
            reason = f"method {value!r} is not {upper!r}: methods are case-sensitive"
            fix = f"write {upper!r}"
    if reason is None:
        return None
    effect = "never matches and excludes nothing" if clause.negated else "never matches"
    return f"{reason}, so it {effect}; {fix}"


def _literal_trust_domain(attribute: Attribute, value: str) -> str | None:
    """The trust domain a value names, if it is spelt out in full (not ``*``-matched)."""
    if value.startswith("*"):
        return None
    prefix = value.endswith("*")
    body = value[:-1] if prefix else value
    if attribute is Attribute.SOURCE_TRUST_DOMAIN:
        return None if prefix else body
    domain, slash, _ = body.partition("/")
    return domain if slash else None


def _shadowed_allows(policies: PolicySet) -> Iterator[LintFinding]:
    """A DENY rule that matches everything, over every workload an ALLOW policy selects.

    DENY is evaluated before ALLOW, so such an ALLOW can never allow anything.
    """
    root = policies.root_namespace
    allows = [
        p
        for p in policies.policies
        if p.action is Action.ALLOW and not p.dry_run and p.rules  # no rules: allows nothing
    ]
    for deny in policies.policies:
        if deny.action is not Action.DENY or deny.dry_run:
            continue
        rule = next((r for r in deny.rules if _matches_everything(r)), None)
        if rule is None:
            continue
        shadowed = [a for a in allows if _covers(deny, a, root)]
        if not shadowed:
            continue
        names = ", ".join(f"{a.namespace}/{a.name} ({a.file}[{a.document}])" for a in shadowed)
        subject = (
            f"ALLOW policy {names} selects, so that policy can"
            if len(shadowed) == 1
            else f"ALLOW policies {names} select, so they can"
        )
        yield LintFinding(
            deny.file,
            deny.document,
            f"spec.rules[{rule.index}]",
            f"DENY rule matches every request and applies to every workload that {subject} "
            "never allow anything (DENY is checked first); narrow this rule with from, to or "
            "when, or remove the ALLOW it makes useless",
        )


def _matches_everything(rule: Rule) -> bool:
    # The loader refuses sources/operations made only of empty lists, so an entry
    # always constrains something.
    return not rule.sources and not rule.operations and not rule.conditions


def _covers(deny: CompiledPolicy, allow: CompiledPolicy, root: str) -> bool:
    """True if ``deny`` certainly applies to every workload ``allow`` applies to."""
    if deny.namespace not in (root, allow.namespace):
        return False
    if not deny.match_labels and deny.target_services is None:
        # Its whole namespace; for the root namespace, the whole mesh.
        return True
    if deny.match_labels:
        # Workloads carrying all of allow's labels carry all of deny's.
        return bool(allow.match_labels) and set(deny.match_labels) <= set(allow.match_labels or ())
    return (
        allow.namespace == deny.namespace
        and bool(allow.target_services)
        and set(allow.target_services or ()) <= set(deny.target_services or ())
    )


def _resolve(document: Any, path: str) -> Any:
    """The YAML value at a field path such as ``spec.rules[0].to[1].operation.paths``."""
    current = document
    for name, index in _PATH_TOKEN.findall(path):
        if name:
            if not isinstance(current, Mapping):
                return None
            current = current.get(name)
        else:
            if not isinstance(current, list) or int(index) >= len(current):
                return None
            current = current[int(index)]
    return current
