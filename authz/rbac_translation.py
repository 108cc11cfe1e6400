"""Istio AuthorizationPolicy → Envoy RBAC filters for one workload, as istiod builds them.

The input is the ``PolicySet`` the loader compiled (one parse, two back ends); the
output decides every request exactly as ``authz.istio_engine`` does, which the
differential test (``tests/e2e/test_rbac_differential.py``) checks against a real
Envoy. Pure: no I/O.

The chain, in Istio's order (CUSTOM before the rest, then AUDIT, DENY, ALLOW)::

    meshward.rbac.http.custom  CUSTOM policies as shadow rules (never enforced): their
                               match is the istio_ext_authz_shadow_effective_policy_id
                               metadata that turns the ext_authz filter on
                               (``ext_authz_enabled_metadata``), as istiod does
    meshward.rbac.http.audit   AUDIT policies, action LOG (access_log_hint)
    meshward.rbac.http.deny    DENY policies; dry-run ones as shadow rules
                               (stat prefix istio_dry_run_deny_)
    meshward.rbac.http.allow   ALLOW policies; dry-run ones as shadow rules
                               (istio_dry_run_allow_)

and the same four network filters (``meshward.rbac.tcp.*``) for the workload's TCP
ports, built as istiod builds its TCP filters: an ALLOW rule that uses an HTTP-only
field is left out, in the other actions only the HTTP-only fields are.

Every slot is always present: an action without policies is an RBAC filter with no
rules, which lets every request through. The listener's chain therefore never
changes with the policies, and a later ECDS server only swaps named configs; each
``RbacFilter`` is a ``TypedExtensionConfig`` (``name`` + ``typed_config``) with a
``digest`` of its content so only changed ones are pushed.

Differences from istiod's output, none of which changes a decision the engine makes:

- policy names are Istio's (``ns[NS]-policy[NAME]-rule[i]``, CUSTOM ones prefixed
  ``istio-ext-authz-``), and Envoy reports the first matching name in byte order;
  the engine reports that same rule (see ``authz.istio_engine``).
- the AUDIT, DENY and ALLOW HTTP filters set ``rules_stat_prefix``
  (``meshward_audit_`` …) so each filter's ``enforced_effective_policy_id`` gets a key
  of its own in the ``envoy.filters.http.rbac`` metadata (istiod's filters overwrite
  one another's): the access log can name the ALLOW rule that let a request in.
- dry-run AUDIT policies are left out: the engine ignores them, istiod would add
  shadow LOG rules that decide nothing.
- matchers differ where istiod's would decide otherwise (``authz.rbac_matchers``).

The filters decide as the engine does only in an Envoy whose runtime has
``ENVOY_RUNTIME``: Envoy 1.40 matches a repeated header (``x-team: a`` and
``x-team: b``) value by value, while ext_authz, and so the engine, sees one value
joined with ``,``; the runtime guard ``rbac_match_headers_individually: false`` gives
the RBAC filter the joined value too. A bootstrap carrying these filters must set it
(``layered_runtime``); the differential test catches an Envoy that drops the guard.

What cannot be translated exactly is a ``PolicyLoadError`` naming the file, document
and field, like the loader's, for the workloads the policy applies to
(``translation_issues`` checks a whole set, for lint); nothing is approximated. Such
a workload gets no native filters until the policy is fixed, or runs in ext_authz
mode. Quietly leaving the policy to ext_authz instead was not chosen: which policies
Envoy enforces, and what a request costs, would then change with the policy text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

# Imported for their descriptors: parsing a filter's Any resolves these types.
import envoy.extensions.filters.http.rbac.v3.rbac_pb2
import envoy.extensions.filters.network.rbac.v3.rbac_pb2
import envoy.extensions.path.match.uri_template.v3.uri_template_match_pb2  # noqa: F401
from google.protobuf import any_pb2, json_format

from authz.errors import PolicyIssue, PolicyLoadError
from authz.istio_policy import Action, Attribute, Clause, CompiledPolicy, PolicySet, Rule
from authz.rbac_matchers import PERMISSION_ATTRIBUTES, Untranslatable, permission, principal

__all__ = [
    "CUSTOM_POLICY_PREFIX",
    "DRY_RUN_ALLOW_PREFIX",
    "DRY_RUN_DENY_PREFIX",
    "ENVOY_RUNTIME",
    "EXT_AUTHZ_SHADOW_PREFIX",
    "HTTP_RBAC",
    "NETWORK_RBAC",
    "RULES_STAT_PREFIX",
    "SLOTS",
    "Family",
    "RbacFilter",
    "Workload",
    "WorkloadRbac",
    "ext_authz_enabled_metadata",
    "parse_policy_name",
    "translate",
    "translation_issues",
]

HTTP_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
NETWORK_RBAC = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
DRY_RUN_ALLOW_PREFIX = "istio_dry_run_allow_"
DRY_RUN_DENY_PREFIX = "istio_dry_run_deny_"
EXT_AUTHZ_SHADOW_PREFIX = "istio_ext_authz_"
CUSTOM_POLICY_PREFIX = "istio-ext-authz-"
# Per-filter keys for enforced results (HTTP only: the network filter has no such field).
RULES_STAT_PREFIX: Mapping[Action, str] = MappingProxyType(
    {
        Action.AUDIT: "meshward_audit_",
        Action.DENY: "meshward_deny_",
        Action.ALLOW: "meshward_allow_",
    }
)
# Runtime an Envoy running these filters must have (see the module docstring).
ENVOY_RUNTIME: Mapping[str, Any] = MappingProxyType(
    {"envoy.reloadable_features.rbac_match_headers_individually": False}
)
_TCP_STAT_PREFIX = "tcp."  # istiod's, for the network filter's required stat_prefix
SLOTS: tuple[Action, ...] = (Action.CUSTOM, Action.AUDIT, Action.DENY, Action.ALLOW)
_ENVOY_ACTION = {Action.AUDIT: "LOG", Action.DENY: "DENY", Action.ALLOW: "ALLOW"}
_NEVER = {
    "permissions": [{"not_rule": {"any": True}}],
    "principals": [{"not_id": {"any": True}}],
}
# istiod's order of a source's and an operation's fields (model.New).
_FIELD_ORDER = {
    a: i
    for i, a in enumerate(
        (
            Attribute.SOURCE_PRINCIPAL,
            Attribute.REQUEST_PRINCIPAL,
            Attribute.SOURCE_NAMESPACE,
            Attribute.SOURCE_SERVICE_ACCOUNT,
            Attribute.SOURCE_TRUST_DOMAIN,
            Attribute.REMOTE_IP,
            Attribute.SOURCE_IP,
            Attribute.HOST,
            Attribute.METHOD,
            Attribute.PATH,
            Attribute.DESTINATION_PORT,
        )
    )
}

JSON = dict[str, Any]


class Family(StrEnum):
    """Which filter chain a filter belongs in: HTTP's connection manager, or a TCP port's."""

    HTTP = "http"
    TCP = "tcp"


@dataclass(slots=True, frozen=True)
class Workload:
    """The workload a sidecar protects, as ``context_extensions`` describe it to ext_authz.

    Its ports are HTTP but for ``tcp_ports``, served as plain TCP; network filters are
    built only when there are some (their rules are the same for every TCP port, which
    ``destination.port`` conditions tell apart at run time, as in Istio).
    """

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    service: str | None = None
    tcp_ports: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class RbacFilter:
    """One filter of the chain; ``as_config()`` is both the HCM/listener filter and the
    ECDS ``TypedExtensionConfig`` resource of that name."""

    name: str
    family: Family
    action: Action
    canonical: str  # the canonical JSON of as_config(): sorted keys, no spaces
    digest: str  # its sha256, for versions: equal digests, equal configs

    @property
    def typed_config(self) -> JSON:
        """A fresh copy: callers may embed it in a bootstrap and edit that."""
        config: JSON = json.loads(self.canonical)["typed_config"]
        return config

    def as_config(self) -> JSON:
        return {"name": self.name, "typed_config": self.typed_config}


@dataclass(slots=True, frozen=True)
class WorkloadRbac:
    """Everything one sidecar needs: its HTTP chain, its TCP chain, and which policies
    (``ns.name``) they hold. ``digest`` changes whenever any filter does."""

    http: tuple[RbacFilter, ...]
    tcp: tuple[RbacFilter, ...]
    policies: tuple[str, ...]
    digest: str

    def filters(self) -> tuple[RbacFilter, ...]:
        return self.http + self.tcp


def translate(policies: PolicySet, workload: Workload) -> WorkloadRbac:
    """The RBAC filters for ``workload``; ``PolicyLoadError`` lists every policy that
    applies to it and cannot be translated exactly."""
    applicable = policies.applicable(workload.namespace, workload.labels, workload.service)
    issues: list[PolicyIssue] = []
    http = tuple(_filter(applicable, Family.HTTP, slot, issues) for slot in SLOTS)
    tcp: tuple[RbacFilter, ...] = ()
    if workload.tcp_ports:
        tcp = tuple(_filter(applicable, Family.TCP, slot, issues) for slot in SLOTS)
    if issues:
        raise PolicyLoadError(_unique(issues))
    chain = hashlib.sha256("\n".join(f.digest for f in http + tcp).encode()).hexdigest()
    return WorkloadRbac(http=http, tcp=tcp, policies=tuple(p.id for p in applicable), digest=chain)


def translation_issues(policies: PolicySet) -> list[PolicyIssue]:
    """What in the set cannot be translated, whatever workload it applies to (for lint)."""
    issues: list[PolicyIssue] = []
    for policy in sorted(policies.policies, key=lambda p: p.rbac_order):
        for family in Family:
            _policies_of([policy], family, issues)
    return _unique(issues)


def ext_authz_enabled_metadata(family: Family) -> JSON:
    """``filter_enabled_metadata`` for the ext_authz filter after the CUSTOM slot: it
    runs only for requests a CUSTOM policy matched (istiod's mechanism)."""
    namespace = "envoy.filters.http.rbac" if family is Family.HTTP else "envoy.filters.network.rbac"
    return {
        "filter": namespace,
        "path": [{"key": EXT_AUTHZ_SHADOW_PREFIX + "shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": CUSTOM_POLICY_PREFIX.rstrip("-")}},
    }


def parse_policy_name(name: str) -> str | None:
    """Istio's ``[istio-ext-authz-]ns[NS]-policy[NAME]-rule[i]`` → the engine's
    ``NS.NAME[rules[i]]`` (the id audit records use); None for anything else."""
    text = name.removeprefix(CUSTOM_POLICY_PREFIX)
    if not (text.startswith("ns[") and text.endswith("]")):
        return None
    namespace, sep, rest = text[3:].partition("]-policy[")
    policy, sep2, index = rest.rpartition("]-rule[")
    index = index[:-1]
    if not (sep and sep2 and namespace and policy and index.isascii() and index.isdigit()):
        return None
    return f"{namespace}.{policy}[rules[{int(index)}]]"


# -- building ----------------------------------------------------------------------


def _filter(
    applicable: Sequence[CompiledPolicy], family: Family, slot: Action, issues: list[PolicyIssue]
) -> RbacFilter:
    of_slot = [p for p in applicable if p.action is slot]
    enforced = [p for p in of_slot if not p.dry_run]
    # Dry-run exists for ALLOW and DENY only (the loader refuses dry-run CUSTOM; a
    # dry-run AUDIT decides and records nothing, in the engine as in Istio).
    dry = [p for p in of_slot if p.dry_run and slot in (Action.ALLOW, Action.DENY)]
    config: JSON = {"@type": HTTP_RBAC if family is Family.HTTP else NETWORK_RBAC}
    if family is Family.TCP:
        config["stat_prefix"] = _TCP_STAT_PREFIX
    if slot is Action.CUSTOM:
        if enforced:
            config["shadow_rules"] = {
                "action": "DENY",
                "policies": _policies_of(enforced, family, issues),
            }
            config["shadow_rules_stat_prefix"] = EXT_AUTHZ_SHADOW_PREFIX
    else:
        if enforced:
            config["rules"] = {
                "action": _ENVOY_ACTION[slot],
                "policies": _policies_of(enforced, family, issues),
            }
            if family is Family.HTTP:
                config["rules_stat_prefix"] = RULES_STAT_PREFIX[slot]
        if dry:
            config["shadow_rules"] = {
                "action": _ENVOY_ACTION[slot],
                "policies": _policies_of(dry, family, issues),
            }
            config["shadow_rules_stat_prefix"] = (
                DRY_RUN_ALLOW_PREFIX if slot is Action.ALLOW else DRY_RUN_DENY_PREFIX
            )
    name = f"meshward.rbac.{family}.{slot.lower()}"
    _check_proto(name, config)
    canonical = json.dumps(
        {"name": name, "typed_config": config}, sort_keys=True, separators=(",", ":")
    )
    return RbacFilter(
        name=name,
        family=family,
        action=slot,
        canonical=canonical,
        digest=hashlib.sha256(canonical.encode()).hexdigest(),
    )


def _check_proto(name: str, config: JSON) -> None:
    # Every filter must be a valid message of its type before anything serves it; a
    # failure here is a bug in this module, not in the policies.
    try:
        json_format.ParseDict(config, any_pb2.Any())
    except json_format.ParseError as exc:
        raise AssertionError(f"{name}: generated an invalid RBAC config: {exc}") from exc


def _policies_of(
    policies: Iterable[CompiledPolicy], family: Family, issues: list[PolicyIssue]
) -> JSON:
    out: JSON = {}
    for policy in policies:
        prefix = CUSTOM_POLICY_PREFIX if policy.action is Action.CUSTOM else ""
        if not policy.rules:
            # istiod: a policy without rules is one that never matches (an ALLOW
            # without rules still makes the filter deny what nothing else allows).
            out[prefix + policy.rbac_name(0)] = _NEVER
            continue
        for rule in policy.rules:
            built = _rule(policy, rule, family, issues)
            if built is not None:
                out[prefix + policy.rbac_name(rule.index)] = built
    return out


def _rule(
    policy: CompiledPolicy, rule: Rule, family: Family, issues: list[PolicyIssue]
) -> JSON | None:
    tcp = family is Family.TCP
    if tcp and policy.action is Action.ALLOW and rule.http_only:
        return None  # istiod: an ALLOW rule needing HTTP never matches a TCP connection

    def kept(clauses: Iterable[Clause]) -> list[Clause]:
        # On TCP the other actions drop the HTTP-only fields: a wider DENY, not a narrower one.
        return [c for c in clauses if not (tcp and c.http_only)]

    conditions = kept(rule.conditions)
    principal_conditions = [c for c in conditions if c.attribute not in PERMISSION_ATTRIBUTES]
    permission_conditions = [c for c in conditions if c.attribute in PERMISSION_ATTRIBUTES]
    principals = [
        {
            "and_ids": {
                "ids": _built(
                    policy, [*_ordered(kept(source)), *principal_conditions], principal, issues
                )
                or [{"any": True}]
            }
        }
        for source in (rule.sources or ((),))
    ]
    permissions = [
        {
            "and_rules": {
                "rules": _built(
                    policy, [*_ordered(kept(operation)), *permission_conditions], permission, issues
                )
                or [{"any": True}]
            }
        }
        for operation in (rule.operations or ((),))
    ]
    return {"permissions": permissions, "principals": principals}


def _ordered(clauses: Iterable[Clause]) -> list[Clause]:
    return sorted(clauses, key=lambda c: _FIELD_ORDER.get(c.attribute, len(_FIELD_ORDER)))


def _built(
    policy: CompiledPolicy,
    clauses: Sequence[Clause],
    build: Callable[[Clause], JSON],
    issues: list[PolicyIssue],
) -> list[JSON]:
    out: list[JSON] = []
    for clause in clauses:
        try:
            out.append(build(clause))
        except Untranslatable as exc:
            issues.append(
                PolicyIssue(
                    policy.file,
                    policy.document,
                    clause.field,
                    f"cannot be enforced by Envoy's RBAC filter as meshward decides it: {exc}",
                )
            )
    return out


def _unique(issues: list[PolicyIssue]) -> list[PolicyIssue]:
    # A clause is seen once per filter family and per condition copy; report it once.
    return list(dict.fromkeys(issues))
