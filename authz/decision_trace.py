"""Why one request was decided the way it was: the Istio policies and the Rego decision.

For ``meshward policy eval``. The decision itself always comes from the server
(``AuthorizationServicer.decide``); this module re-runs the same pure engines on the
same request to show what the decision record leaves out:

- every AuthorizationPolicy that applies to the destination workload, in evaluation
  order, and the first of its rules that matches (each policy is evaluated alone, so
  a policy after the deciding one still shows whether it would have matched);
- the rule that decided and the dry-run shadow results;
- the Rego decision: its path, its package, the value the policy produced (headers and
  body included: the request is the author's own) and, with dry-run packages, the
  shadow value over the full set. The engine cannot say which rule produced a value, so
  the decision path and its package are as precise as the trace gets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2

from authz.errors import BadRequestError
from authz.istio_engine import IstioDecision, ShadowResult, evaluate
from authz.istio_policy import Action, CompiledPolicy, PolicySet
from authz.rego_engine import RegoEngine, RegoResult
from authz.rego_input import build_input
from authz.request_view import RequestView

_ORDER = (Action.CUSTOM, Action.DENY, Action.ALLOW, Action.AUDIT)

__all__ = [
    "PolicyMatch",
    "RegoTrace",
    "istio_summary",
    "istio_trace",
    "rego_trace",
    "shadow_dict",
    "shadow_lines",
]


@dataclass(slots=True, frozen=True)
class PolicyMatch:
    """One AuthorizationPolicy that applies to the workload, and its first matching rule."""

    policy: str  # namespace.name
    action: str
    dry_run: bool
    provider: str | None
    matched_rule: str | None  # namespace.name[rules[i]]; None: no rule matched
    file: str
    document: int
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "action": self.action,
            "dry_run": self.dry_run,
            "provider": self.provider,
            "matched_rule": self.matched_rule,
            "file": self.file,
            "document": self.document,
            "note": self.note,
        }


def istio_trace(policies: PolicySet, view: RequestView) -> tuple[list[PolicyMatch], IstioDecision]:
    """The policies that apply to the request's workload, in evaluation order, and the
    Istio decision."""
    applicable = list(
        policies.applicable(view.workload_namespace, view.workload_labels, view.workload_service)
    )
    # Istio's order: CUSTOM, DENY, ALLOW, then AUDIT, which never decides; within an
    # action, the engine's (Envoy's RBAC) order, kept by the stable sort.
    applicable.sort(key=lambda p: _ORDER.index(p.action))
    matches = [_match(policy, policies.root_namespace, view) for policy in applicable]
    return matches, evaluate(policies, view)


def _match(policy: CompiledPolicy, root_namespace: str, view: RequestView) -> PolicyMatch:
    alone = evaluate(PolicySet((policy,), root_namespace=root_namespace), view)
    rule: str | None = None
    note = ""
    if policy.dry_run and policy.action in (Action.CUSTOM, Action.AUDIT):
        note = "dry-run exists for ALLOW and DENY only: this policy is ignored, as in Istio"
    elif policy.dry_run:
        shadow = alone.dry_run_allow if policy.action is Action.ALLOW else alone.dry_run_deny
        rule = shadow.effective_policy_id if shadow else None
    elif policy.action is Action.CUSTOM:
        rule = alone.custom_policy_id
    elif policy.action is Action.AUDIT:
        rule = alone.audit_policy_ids[0] if alone.audit_policy_ids else None
    elif alone.action is policy.action:
        # A DENY that matched, or an ALLOW that allowed; "no_allow_policy_matched" names none.
        rule = alone.policy_id
    return PolicyMatch(
        policy=policy.id,
        action=str(policy.action),
        dry_run=policy.dry_run,
        provider=policy.provider,
        matched_rule=rule,
        file=policy.file,
        document=policy.document,
        note=note,
    )


def shadow_dict(shadow: ShadowResult | None) -> dict[str, Any] | None:
    """An Istio dry-run engine's result: ``{"result": allowed|denied, "policy": …}``."""
    if shadow is None:
        return None
    return {
        "result": "allowed" if shadow.allowed else "denied",
        "policy": shadow.effective_policy_id,
    }


@dataclass(slots=True, frozen=True)
class RegoTrace:
    """The Rego decision for one request, as the server evaluates it (values included)."""

    decision: str  # data.envoy.authz.allow
    package: str
    dry_run_packages: tuple[str, ...]
    result: RegoResult | None  # None: the input could not be built (``input_error``)
    shadow: RegoResult | None = None
    input_error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "package": self.package,
            "dry_run_packages": list(self.dry_run_packages),
            "result": _result_dict(self.result),
            "shadow": _result_dict(self.shadow),
            "input_error": self.input_error,
        }


def _result_dict(result: RegoResult | None) -> dict[str, Any] | None:
    if result is None:
        return None
    if result.defined:
        return {"value": result.value, "dry_run": result.dry_run}
    return {"error": result.error, "detail": result.detail, "dry_run": result.dry_run}


def rego_trace(
    engine: RegoEngine,
    request: external_auth_pb2.CheckRequest,
    view: RequestView,
    *,
    parse_body: bool,
    max_body_bytes: int,
) -> RegoTrace:
    """Evaluate ``engine`` on ``request`` as the server does, keeping the values."""
    packages = tuple(sorted(engine.dry_run_packages))
    try:
        document = build_input(
            request, view, parse_body=parse_body, max_body_bytes=max_body_bytes
        ).document
    except BadRequestError as exc:
        return RegoTrace(engine.decision, engine.package, packages, None, input_error=str(exc))
    evaluation = engine.evaluate_enforced(document)
    return RegoTrace(
        engine.decision, engine.package, packages, evaluation.result, evaluation.shadow
    )


def istio_summary(istio: IstioDecision | None) -> dict[str, Any]:
    """The Istio engine's verdict as ``policy eval`` and ``audit explain`` report it."""
    return {
        "allowed": istio.allowed if istio else None,
        "reason": istio.reason if istio else None,
        "action": str(istio.action) if istio and istio.action else None,
        "policy_id": istio.policy_id if istio else None,
        "custom_provider": istio.custom_provider if istio else None,
        "custom_policy_id": istio.custom_policy_id if istio else None,
        "audit_policy_ids": list(istio.audit_policy_ids) if istio else [],
        "dry_run_allow": shadow_dict(istio.dry_run_allow) if istio else None,
        "dry_run_deny": shadow_dict(istio.dry_run_deny) if istio else None,
    }


def shadow_lines(istio: Mapping[str, Any]) -> list[str]:
    """An ``istio_summary``'s dry-run shadow results as the CLI prints them."""
    lines = []
    for engine in ("allow", "deny"):
        shadow = istio[f"dry_run_{engine}"]
        if shadow is not None:
            lines.append(
                f"  dry-run {engine.upper()} shadow: {shadow['result']}"
                + (f" by {shadow['policy']}" if shadow["policy"] else "")
            )
    return lines
