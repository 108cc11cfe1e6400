"""Evaluate a request view against a compiled Istio policy set, with Istio's semantics.

Order (Istio's authorization docs): CUSTOM, then DENY, then ALLOW; AUDIT is recorded
and never changes the decision; dry-run policies run in separate shadow engines and
never change it either.

TCP (non-HTTP) requests, as Istio's RBAC builder does: HTTP-only attributes
(hosts, methods, paths, requestPrincipals, ``request.headers``, ``request.auth.*``)
do not exist on a TCP connection, so

- in an ALLOW policy a rule that uses any of them is dropped (it never matches;
  an ALLOW policy left with no usable rule denies the connection), and
- in DENY, AUDIT and CUSTOM policies only the HTTP-only fields are dropped and the
  rest of the rule still applies (a DENY rule made only of HTTP-only fields thus
  denies every TCP connection: Istio errs towards denying).

Dry-run exists for ALLOW and DENY (Istio's two shadow engines); a dry-run AUDIT
policy is neither enforced nor recorded. ``evaluate`` takes no clock and does no I/O.

Which rule is reported when several match: the one Envoy's RBAC filter reports for
the filters ``authz.rbac_translation`` generates, i.e. the first in the byte order of
Istio's RBAC policy names ``ns[NS]-policy[NAME]-rule[i]`` (so ``ns[default]`` before
``ns[istio-system]``, ``policy[a-b]`` before ``policy[a]``, ``rule[10]`` before
``rule[2]``). The audit trail then names the same rule whichever back end decided.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from authz.istio_policy import (
    Action,
    Attribute,
    Clause,
    CompiledPolicy,
    ListValueMatch,
    PolicySet,
    Rule,
)
from authz.request_view import RequestView

__all__ = ["IstioDecision", "ShadowResult", "evaluate"]


@dataclass(slots=True, frozen=True)
class ShadowResult:
    """What one dry-run engine would have decided.

    ``effective_policy_id`` is the dry-run rule that matched (``ns.name[rules[i]]``),
    as Istio's ``istio_dry_run_{allow,deny}_shadow_effective_policy_id``; None when
    no dry-run rule matched. ``policies`` are the dry-run policies (``ns.name``) the
    shadow engine held for the workload.
    """

    allowed: bool
    effective_policy_id: str | None
    policies: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class IstioDecision:
    """The Istio engine's answer for one request.

    ``allowed`` is the outcome of the DENY and ALLOW layers. When
    ``custom_provider`` is set a CUSTOM policy matched: Istio asks that provider
    first, so the caller must run it and deny if it denies, and otherwise apply
    ``allowed``. ``action`` is the layer that decided (None: no enforced policy
    applies and the request is allowed by default); ``policy_id`` the rule that
    decided (``ns.name[rules[i]]``), None when the decision is "no ALLOW policy
    matched" or the default. ``reason`` is a stable string for logs, metrics and
    the audit record.
    """

    allowed: bool
    reason: str
    action: Action | None = None
    policy_id: str | None = None
    custom_provider: str | None = None
    custom_policy_id: str | None = None
    audit_policy_ids: tuple[str, ...] = ()
    dry_run_allow: ShadowResult | None = None
    dry_run_deny: ShadowResult | None = None
    policies_considered: int = 0

    @property
    def delegated(self) -> bool:
        return self.custom_provider is not None


def evaluate(policies: PolicySet, view: RequestView) -> IstioDecision:
    candidates = policies.candidates(
        view.workload_namespace, view.workload_labels, view.workload_service
    )
    applicable = [
        p
        for p in candidates
        if p.selects(view.workload_namespace, view.workload_labels, view.workload_service)
    ]
    # Envoy's order (see the module docstring): when several rules match, the one
    # reported is the one Envoy's RBAC filter would name.
    applicable.sort(key=lambda p: p.rbac_order)

    custom_provider: str | None = None
    custom_id: str | None = None
    for policy in _with_action(applicable, Action.CUSTOM, dry_run=False):
        hit = _first_matching_rule(policy, view)
        if hit is not None:
            custom_provider, custom_id = policy.provider, policy.rule_id(hit)
            break

    audit_ids = tuple(
        policy.rule_id(hit)
        for policy in _with_action(applicable, Action.AUDIT, dry_run=False)
        if (hit := _first_matching_rule(policy, view)) is not None
    )
    # What every outcome carries; the layers below only fill in the verdict.
    base = IstioDecision(
        allowed=True,
        reason="no_allow_policy",
        custom_provider=custom_provider,
        custom_policy_id=custom_id,
        audit_policy_ids=audit_ids,
        dry_run_allow=_shadow(applicable, Action.ALLOW, view),
        dry_run_deny=_shadow(applicable, Action.DENY, view),
        policies_considered=len(candidates),
    )

    for policy in _with_action(applicable, Action.DENY, dry_run=False):
        hit = _first_matching_rule(policy, view)
        if hit is not None:
            return replace(
                base,
                allowed=False,
                reason="denied_by_policy",
                action=Action.DENY,
                policy_id=policy.rule_id(hit),
            )

    allow = list(_with_action(applicable, Action.ALLOW, dry_run=False))
    if not allow:
        return base
    for policy in allow:
        hit = _first_matching_rule(policy, view)
        if hit is not None:
            return replace(
                base,
                reason="allowed_by_policy",
                action=Action.ALLOW,
                policy_id=policy.rule_id(hit),
            )
    return replace(base, allowed=False, reason="no_allow_policy_matched", action=Action.ALLOW)


def _with_action(
    policies: Iterable[CompiledPolicy], action: Action, *, dry_run: bool
) -> Iterable[CompiledPolicy]:
    return (p for p in policies if p.action is action and p.dry_run is dry_run)


def _shadow(
    applicable: Sequence[CompiledPolicy], action: Action, view: RequestView
) -> ShadowResult | None:
    """Istio's shadow engine for the dry-run policies of one action.

    Like Istio, it holds only the dry-run policies: no dry-run policy of that action,
    no shadow result.
    """
    dry = list(_with_action(applicable, action, dry_run=True))
    if not dry:
        return None
    ids = tuple(policy.id for policy in dry)
    for policy in dry:
        hit = _first_matching_rule(policy, view)
        if hit is not None:
            return ShadowResult(
                allowed=action is Action.ALLOW,
                effective_policy_id=policy.rule_id(hit),
                policies=ids,
            )
    return ShadowResult(allowed=action is not Action.ALLOW, effective_policy_id=None, policies=ids)


def _first_matching_rule(policy: CompiledPolicy, view: RequestView) -> int | None:
    for rule in policy.rules_in_rbac_order:
        if _rule_matches(rule, view, allow=policy.action is Action.ALLOW):
            return rule.index
    return None


def _rule_matches(rule: Rule, view: RequestView, *, allow: bool) -> bool:
    drop_http = not view.is_http
    if drop_http and allow and rule.http_only:
        return False
    if rule.sources and not any(_all_match(s, view, drop_http) for s in rule.sources):
        return False
    if rule.operations and not any(_all_match(o, view, drop_http) for o in rule.operations):
        return False
    return _all_match(rule.conditions, view, drop_http)


def _all_match(clauses: Iterable[Clause], view: RequestView, drop_http: bool) -> bool:
    return all(_clause_matches(c, view) for c in clauses if not (drop_http and c.http_only))


def _clause_matches(clause: Clause, view: RequestView) -> bool:
    if clause.attribute is Attribute.FILTER_METADATA:
        hit = _filter_metadata_matches(clause, view)
    else:
        candidates = _candidates(clause, view)
        hit = any(m.matches(c) for c in candidates for m in clause.matchers)
    return not hit if clause.negated else hit


def _filter_metadata_matches(clause: Clause, view: RequestView) -> bool:
    # "[v]" matches an element of a list value, "v" a string value (Istio's generator).
    filter_name, key = clause.key
    value = _lookup(view.filter_metadata.get(filter_name), (key,))
    for matcher in clause.matchers:
        if isinstance(matcher, ListValueMatch):
            if isinstance(value, list) and any(
                isinstance(v, str) and matcher.matches(v) for v in value
            ):
                return True
        elif isinstance(value, str) and matcher.matches(value):
            return True
    return False


def _candidates(clause: Clause, view: RequestView) -> tuple[str, ...]:
    """The request's value(s) for the clause's attribute; () when absent."""
    a = clause.attribute
    value: str | None
    if a is Attribute.SOURCE_PRINCIPAL:
        value = view.source_principal
    elif a is Attribute.SOURCE_NAMESPACE:
        value = view.source_namespace
    elif a is Attribute.SOURCE_SERVICE_ACCOUNT:
        ns, sa = view.source_namespace, view.source_service_account
        value = f"{ns}/{sa}" if ns is not None and sa is not None else None
    elif a is Attribute.SOURCE_TRUST_DOMAIN:
        value = view.source_trust_domain
    elif a is Attribute.SOURCE_IP:
        value = view.source_ip
    elif a is Attribute.REMOTE_IP:
        value = view.remote_ip
    elif a is Attribute.DESTINATION_IP:
        value = view.destination_ip
    elif a is Attribute.DESTINATION_PORT:
        value = None if view.destination_port is None else str(view.destination_port)
    elif a is Attribute.SNI:
        value = view.sni
    elif a is Attribute.METHOD:
        value = view.method
    elif a is Attribute.PATH:
        value = view.path_without_query
    elif a is Attribute.HOST:
        return _host_forms(view.host)
    elif a is Attribute.HEADER:
        value = view.headers.get(clause.key[0])
    elif a is Attribute.REQUEST_PRINCIPAL:
        value = view.request_principal
    elif a is Attribute.AUTH_AUDIENCES:
        return _strings(_lookup(view.request_auth, ("aud",)))
    elif a is Attribute.AUTH_PRESENTER:
        return _strings(_lookup(view.request_auth, ("azp",)))
    elif a is Attribute.AUTH_CLAIM:
        return _strings(_lookup(view.request_auth, clause.key))
    else:  # FILTER_METADATA is matched by _filter_metadata_matches
        return ()
    return () if value is None else (value,)


def _host_forms(host: str | None) -> tuple[str, ...]:
    """The host as sent and, if it carries a port, without it (``a.com:8080`` → ``a.com``)."""
    if host is None:
        return ()
    name, sep, port = host.rpartition(":")
    # ASCII digits only, like Envoy (str.isdigit alone accepts fullwidth and other digits).
    if sep and port.isascii() and port.isdigit() and (":" not in name or name.endswith("]")):
        return (host, name)
    return (host,)


def _lookup(data: Mapping[str, Any] | None, path: Sequence[str]) -> Any:
    current: Any = data
    for part in path:
        if not isinstance(current, Mapping):
            return None
        current = current.get(part)
    return current


def _strings(value: Any) -> tuple[str, ...]:
    # Istio matches string claims and lists of strings; other JSON types never match.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()
