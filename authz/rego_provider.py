"""The Rego engine as the ext_authz server runs it for one request.

Builds OPA-Envoy's input, evaluates the enforced decision (and, with dry-run
packages, the shadow one over the full set), and interprets both as OPA-Envoy
would. Dry-run is resolved here into one flag, ``enforced``: False under
``authz.rego.dry_run`` or when the decision's own package is dry-run, in which case
the server treats a denial as an allow and records the real result.

No I/O, no logging: this runs on every request the Rego engine decides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from envoy.service.auth.v3 import external_auth_pb2

from authz.errors import BadRequestError
from authz.rego_decision import DENIED, FAILURE_REASONS, RegoDecision, interpret
from authz.rego_engine import RegoEngine, RegoResult
from authz.rego_input import DEFAULT_MAX_BODY_BYTES, build_input
from authz.request_view import RequestView

__all__ = [
    "RegoOutcome",
    "RegoSettings",
    "error",
    "evaluation_outcome",
    "run_rego",
    "summary",
]


@dataclass(slots=True, frozen=True)
class RegoSettings:
    """``authz.rego`` as the server needs it (the loader takes the decision path)."""

    mode: Literal["custom", "always"] = "custom"
    dry_run: bool = False
    parse_body: bool = True
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout: float | None = 0.1  # seconds


@dataclass(slots=True, frozen=True)
class RegoOutcome:
    """What the Rego engine said about one request.

    ``decision`` is the result the server acts on, ``enforced`` False when it must not
    deny (dry-run). ``shadow`` is the full set's decision (dry-run packages included)
    when it differs from ``decision``; ``dry_run_packages`` the set's dry-run packages.
    ``body_error`` says why ``input.parsed_body`` is absent.
    """

    decision: RegoDecision
    enforced: bool = True
    shadow: RegoDecision | None = None
    dry_run_packages: tuple[str, ...] = ()
    body_error: str | None = None

    @property
    def allows(self) -> bool:
        """The request may go on: the policy allowed, or its denial is not enforced."""
        return self.decision.allowed or not self.enforced


def run_rego(
    engine: RegoEngine,
    request: external_auth_pb2.CheckRequest,
    view: RequestView,
    settings: RegoSettings,
) -> RegoOutcome:
    """Evaluate ``engine`` for ``request``; never raises for what the policy does.

    Raises BadRequestError (``invalid_path``, ``invalid_query``) for a request
    OPA-Envoy would fail, with a detail that does not repeat the request's path: the
    caller records it, and a query may carry a token.
    """
    try:
        rego_input = build_input(
            request,
            view,
            parse_body=settings.parse_body,
            max_body_bytes=settings.max_body_bytes,
        )
    except BadRequestError as exc:
        raise BadRequestError(
            exc.reason, "the path or query cannot be read the way OPA-Envoy reads it"
        ) from None
    evaluation = engine.evaluate_enforced(rego_input.document, timeout=settings.timeout)
    decision = interpret(evaluation.result)
    shadow = evaluation.shadow
    return RegoOutcome(
        decision=decision,
        enforced=not (settings.dry_run or evaluation.result.dry_run),
        shadow=interpret(shadow)
        if shadow is not None and _differs(evaluation.result, shadow)
        else None,
        dry_run_packages=tuple(sorted(engine.dry_run_packages)),
        body_error=rego_input.body_error,
    )


def evaluation_outcome(decision: RegoDecision) -> str:
    """The ``outcome`` label of ``meshward_rego_evaluations_total``."""
    if decision.allowed:
        return "allowed"
    return "denied" if decision.reason == DENIED else decision.reason


def summary(decision: RegoDecision) -> dict[str, Any]:
    """What the decision record keeps of a Rego decision: never header values or a body."""
    out: dict[str, Any] = {"allowed": decision.allowed, "reason": decision.reason}
    if not decision.allowed and decision.http_status is not None:
        out["http_status"] = decision.http_status
    return out


def error(decision: RegoDecision) -> str | None:
    """Why the decision is a failure (``undefined: …``); None when the policy decided."""
    if decision.reason not in FAILURE_REASONS:
        return None
    return f"{decision.reason}: {decision.detail}" if decision.detail else decision.reason


def _differs(result: RegoResult, shadow: RegoResult) -> bool:
    # The whole value counts, not only `allowed`: a staged package that changes a
    # header or the status changes what the client would get. Compared as JSON, where
    # true and 1 differ.
    if result.error is not None or shadow.error is not None:
        return result.error != shadow.error
    return json.dumps(result.value, sort_keys=True) != json.dumps(shadow.value, sort_keys=True)
