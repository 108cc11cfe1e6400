"""``envoy.service.auth.v3.Authorization/Check`` for grpc.aio: view → engines → response.

The two engines combine the way Istio runs an ext_authz CUSTOM provider, the Rego
engine being the provider named ``rego``:

1. The Istio engine evaluates the request (its CUSTOM, DENY and ALLOW layers).
2. When an enforced CUSTOM policy matched, the Rego engine decides first. Its denial
   is final and answered with the policy's status, body and headers.
3. Otherwise, or after a Rego allow, Istio's DENY/ALLOW verdict applies.
4. With ``authz.rego.mode: always`` the Rego engine also decides every request the
   Istio engine allowed (once per request: a CUSTOM evaluation is that decision).
5. An allow carries the Rego decision's allow-side edits (headers, query).

The record names the engine that decided: ``rego`` for a Rego denial, and for an
allow when Rego had the last word (mode ``always``, or CUSTOM with no Istio ALLOW
policy applying); ``istio`` when the Istio layers did; ``error`` when nothing could
decide. A Rego result that is not enforced (``authz.rego.dry_run``, or the decision's
package is dry-run) never denies and never decides; it is recorded, as OPA-Envoy's
dry-run records what would have happened.

Fails closed: any error while deciding answers PERMISSION_DENIED with a named reason,
counted in ``meshward_authz_decisions_total{result,reason}`` and recorded in the audit
sink like any other decision. The audit hand-off never blocks the response. When the
sink cannot keep a record (the spool is full) and ``audit_required`` is set
(``audit.on_full: deny``), an allow becomes a denial with reason
``audit_unavailable``: no request passes unaudited.

Deciding stays synchronous on the event loop: a Rego evaluation holds the GIL (regorus
through its Python binding), as the input, the Istio engine and the response do, so a
thread would only add its hand-off (37 µs for ``asyncio.to_thread`` on the 2-core
development machine). A slow
policy is bounded by ``authz.rego.timeout`` only in what is enforced, since regorus's
Python binding cannot interrupt an evaluation (see ``authz.rego_engine``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from audit.record import DecisionRecord, new_decision_id, split_policy_id
from audit.redaction import Redaction
from audit.sink import AuditSink
from authz import rego_provider
from authz.audit_record import dry_run_flips, request_snapshot, workload_name
from authz.check_request import build_view
from authz.check_response import (
    DENY_BODY,
    allow_response,
    deny_response,
    dry_run_metadata,
    rego_dry_run_metadata,
)
from authz.errors import AuthzError
from authz.istio_engine import IstioDecision, evaluate
from authz.policy_store import PolicyStore, ServedPolicies
from authz.rego_decision import ALLOWED, RegoDecision
from authz.rego_engine import RegoEngine
from authz.rego_provider import RegoOutcome, RegoSettings, run_rego
from authz.request_view import RequestView

__all__ = ["AUDIT_UNAVAILABLE", "DENY_BODY", "REGO_PROVIDER", "AuthorizationServicer"]

log = logging.getLogger(__name__)
REGO_PROVIDER = "rego"  # the CUSTOM provider name that calls the Rego engine
AUDIT_UNAVAILABLE = "audit_unavailable"  # the reason of a denial for lack of audit room
# Decisions take tens of microseconds; Prometheus' default buckets start at 5 ms.
_SECONDS_BUCKETS = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    1.0,
)


@dataclass(slots=True)
class _Trace:
    """What one decision has learned so far, for its record whatever way it ends."""

    decision_id: str
    started: float
    request: external_auth_pb2.CheckRequest
    view: RequestView | None = None
    version: str | None = None
    istio: IstioDecision | None = None
    rego: RegoOutcome | None = None
    rego_decision: str | None = None
    dry_run: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class _Verdict:
    """The final answer, before it becomes a CheckResponse and a record."""

    allowed: bool
    reason: str
    engine: str
    policy_id: str | None = None
    error: str | None = None
    status: int = 403
    body: str = DENY_BODY
    content_type: str | None = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()  # a Rego denial's, to the client
    edits: RegoDecision | None = None  # a Rego allow's, applied on allow


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        store: PolicyStore,
        sink: AuditSink,
        registry: CollectorRegistry,
        explain_denials: bool = False,
        rego: RegoSettings | None = None,
        redaction: Redaction | None = None,
        audit_required: bool = False,
    ) -> None:
        self._store = store
        self._sink = sink
        self._explain = explain_denials
        self._rego = rego or RegoSettings()
        # None: records carry no request snapshot (the offline tools' memory sink).
        self._redaction = redaction
        self._audit_required = audit_required
        self.decisions = Counter(
            "meshward_authz_decisions",
            "ext_authz decisions, by result and the reason that decided them",
            ["result", "reason"],
            registry=registry,
        )
        self.rego_evaluations = Counter(
            "meshward_rego_evaluations",
            "Rego decisions evaluated for requests, by outcome (allowed, denied, undefined, "
            "eval_error, timeout, bad_decision); dry-run shadows not counted",
            ["outcome"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "meshward_authz_decision_seconds",
            "Time to decide one Check, by the engine that decided (istio, rego, error)",
            ["engine"],
            registry=registry,
            buckets=_SECONDS_BUCKETS,
        )
        self.policy_decisions = Counter(
            "meshward_authz_policy_decisions",
            "ext_authz decisions by the policy that decided (ns.name, a Rego decision path, "
            "or none), the engine and the result",
            ["policy", "engine", "result"],
            registry=registry,
        )
        self._counts: dict[tuple[bool, str], Any] = {}
        self._by_policy: dict[tuple[str | None, str, bool], Any] = {}
        self._seconds: dict[str, Any] = {}

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return self.decide(request)

    def decide(self, request: external_auth_pb2.CheckRequest) -> Any:
        """The whole decision, synchronous and without I/O (the audit sink only queues)."""
        trace = _Trace(decision_id=new_decision_id(), started=time.perf_counter(), request=request)
        served = self._store.current
        try:
            trace.view = build_view(request)
            if served is None:
                return self._fail(trace, "no_policy_set", "no policy set loaded")
            trace.version = served.version
            if self._rego.mode == "always" and served.rego is None:
                return self._fail(
                    trace,
                    "rego_not_loaded",
                    "authz.rego.mode is always but rego/ holds no Rego modules",
                )
            return self._respond(trace, self._verdict(trace, request, served))
        except AuthzError as exc:
            reason = str(getattr(exc, "reason", "request_parse_error"))
            return self._fail(trace, reason, str(exc))
        except Exception as exc:
            log.exception("authz: decision %s failed", trace.decision_id)
            return self._fail(trace, "internal_error", repr(exc))

    def _verdict(
        self, trace: _Trace, request: external_auth_pb2.CheckRequest, served: ServedPolicies
    ) -> _Verdict:
        assert trace.view is not None
        istio = trace.istio = evaluate(served.istio, trace.view)
        trace.dry_run.update(dry_run_metadata(istio))
        custom_id = istio.custom_policy_id
        if istio.custom_provider is not None:
            if istio.custom_provider != REGO_PROVIDER or served.rego is None:
                return _Verdict(
                    False,
                    "custom_provider_unavailable",
                    "error",
                    policy_id=custom_id,
                    error=f"CUSTOM provider {istio.custom_provider!r} is not available: "
                    "rego/ holds no Rego modules",
                )
            outcome = self._run_rego(trace, served.rego, request)
            if not outcome.allows:
                return self._rego_denial(outcome.decision, custom_id)
        if not istio.allowed:
            explained = f" by {istio.policy_id}" if self._explain and istio.policy_id else ""
            return _Verdict(
                False, istio.reason, "istio", istio.policy_id, body=DENY_BODY + explained
            )
        rego = trace.rego
        if rego is None and self._rego.mode == "always":
            assert served.rego is not None  # decide() denied rego_not_loaded already
            rego = self._run_rego(trace, served.rego, request)
            if not rego.allows:
                return self._rego_denial(rego.decision, served.rego.decision)
        if rego is None:
            return _Verdict(True, istio.reason, "istio", istio.policy_id)
        # A denial let through by dry-run brings none of its edits: OPA-Envoy's dry-run
        # answers a bare OK.
        edits = rego.decision if rego.decision.allowed else None
        if rego.enforced and (self._rego.mode == "always" or istio.action is None):
            # Rego had the last word: nothing ran after it, or no Istio ALLOW applied.
            return _Verdict(True, ALLOWED, "rego", custom_id or trace.rego_decision, edits=edits)
        return _Verdict(True, istio.reason, "istio", istio.policy_id, edits=edits)

    def _run_rego(
        self, trace: _Trace, engine: RegoEngine, request: external_auth_pb2.CheckRequest
    ) -> RegoOutcome:
        assert trace.view is not None
        trace.rego_decision = engine.decision
        outcome = trace.rego = run_rego(engine, request, trace.view, self._rego)
        self.rego_evaluations.labels(rego_provider.evaluation_outcome(outcome.decision)).inc()
        return outcome

    def _rego_denial(self, decision: RegoDecision, policy_id: str | None) -> _Verdict:
        if decision.body is not None:
            body, content_type = decision.body, None
        else:
            explained = f" by {policy_id}" if self._explain and policy_id else ""
            body, content_type = DENY_BODY + explained, "text/plain"
        return _Verdict(
            False,
            decision.reason,
            "rego",
            policy_id,
            status=decision.http_status or 403,
            body=body,
            content_type=content_type,
            headers=decision.headers,
        )

    def _respond(self, trace: _Trace, verdict: _Verdict) -> Any:
        metadata = self._metadata(trace)
        verdict = self._finish(trace, verdict)
        if verdict.allowed:
            edits = verdict.edits
            return allow_response(
                decision_id=trace.decision_id,
                dynamic_metadata=metadata,
                headers=edits.headers if edits else (),
                headers_to_remove=edits.request_headers_to_remove if edits else (),
                response_headers_to_add=edits.response_headers_to_add if edits else (),
                query_parameters_to_set=edits.query_parameters_to_set if edits else (),
                query_parameters_to_remove=edits.query_parameters_to_remove if edits else (),
            )
        return deny_response(
            decision_id=trace.decision_id,
            body=verdict.body,
            dynamic_metadata=metadata,
            status=verdict.status,
            headers=verdict.headers,
            content_type=verdict.content_type,
        )

    def _metadata(self, trace: _Trace) -> dict[str, Any]:
        # The policy's own dynamic_metadata first (OPA-Envoy sends it on allow, deny and
        # dry-run alike); the dry-run keys after it, so a policy cannot mask them.
        rego = trace.rego
        if rego is not None:
            trace.dry_run.update(
                rego_dry_run_metadata(
                    result=None if rego.enforced else rego.decision,
                    shadow=rego.shadow,
                    packages=rego.dry_run_packages,
                )
            )
        metadata = dict(rego.decision.dynamic_metadata or {}) if rego is not None else {}
        metadata.update(trace.dry_run)
        return metadata

    def _fail(self, trace: _Trace, reason: str, error: str) -> Any:
        verdict = _Verdict(
            False,
            reason,
            "error",
            policy_id=trace.istio.custom_policy_id if trace.istio else None,
            error=error,
        )
        self._finish(trace, verdict)
        # Only the dry-run keys: the policy's own metadata may be what failed.
        return deny_response(
            decision_id=trace.decision_id, body=DENY_BODY, dynamic_metadata=trace.dry_run
        )

    def _finish(self, trace: _Trace, verdict: _Verdict) -> _Verdict:
        """Record the decision and count it; the verdict to answer (see audit_required)."""
        record, snapshot = self._record(trace, verdict)
        policy = record.policy
        if not self._sink.submit(record, snapshot) and self._audit_required and verdict.allowed:
            policy = None
            verdict = _Verdict(
                False,
                AUDIT_UNAVAILABLE,
                "error",
                error="the audit spool is full (audit.on_full: deny)",
            )
        self._count(verdict.allowed, verdict.reason).inc()
        key = (policy, verdict.engine, verdict.allowed)
        by_policy = self._by_policy.get(key)
        if by_policy is None:
            by_policy = self._by_policy[key] = self.policy_decisions.labels(
                key[0] or "none", key[1], "allow" if key[2] else "deny"
            )
        by_policy.inc()
        seconds = self._seconds.get(verdict.engine)
        if seconds is None:
            seconds = self._seconds[verdict.engine] = self.decision_seconds.labels(verdict.engine)
        seconds.observe(time.perf_counter() - trace.started)
        return verdict

    def _count(self, allowed: bool, reason: str) -> Any:
        # labels() costs about as much as the rest of the bookkeeping; the children are
        # kept (reasons are a small fixed set of names).
        key = (allowed, reason)
        child = self._counts.get(key)
        if child is None:
            child = self._counts[key] = self.decisions.labels(
                "allow" if allowed else "deny", reason
            )
        return child

    def _record(self, trace: _Trace, verdict: _Verdict) -> tuple[DecisionRecord, bytes | None]:
        view, istio, rego = trace.view, trace.istio, trace.rego
        shadow: dict[str, Any] | None = None
        if rego is not None and rego.shadow is not None:
            shadow = rego_provider.summary(rego.shadow)
            if (why := rego_provider.error(rego.shadow)) is not None:
                shadow["error"] = why
            shadow["dry_run_packages"] = list(rego.dry_run_packages)
        snapshot: bytes | None = None
        redacted: tuple[str, ...] = ()
        if self._redaction is not None:
            try:
                snapshot, redacted = request_snapshot(
                    trace.request, view.headers if view else None, self._redaction
                )
            except Exception:
                # A request the snapshot cannot handle is recorded without it: replay
                # counts it as not re-evaluable rather than the decision going unrecorded.
                log.exception("authz: decision %s: no request snapshot", trace.decision_id)
                redacted = ("request",)
        policy, rule = split_policy_id(verdict.policy_id)
        record = DecisionRecord(
            decision_id=trace.decision_id,
            time_us=time.time_ns() // 1000,
            allowed=verdict.allowed,
            reason=verdict.reason,
            engine=verdict.engine,
            status=None if verdict.allowed else verdict.status,
            policy=policy,
            rule=rule,
            policy_id=verdict.policy_id,
            policy_set_version=trace.version,
            latency_us=int((time.perf_counter() - trace.started) * 1e6),
            source_principal=view.source_principal if view else None,
            source_namespace=view.source_namespace if view else None,
            source_ip=view.source_ip if view else None,
            request_principal=view.request_principal if view else None,
            destination_namespace=view.workload_namespace if view else None,
            destination_workload=(
                workload_name(view.workload_labels, view.workload_service) if view else None
            ),
            destination_service=view.workload_service if view else None,
            destination_labels=dict(view.workload_labels) if view else {},
            destination_port=view.destination_port if view else None,
            sni=view.sni if view else None,
            method=view.method if view else None,
            host=view.host if view else None,
            path=view.path_without_query if view else None,
            audit_policy_ids=istio.audit_policy_ids if istio else (),
            dry_run=dict(trace.dry_run) or None,
            dry_run_flips=dry_run_flips(
                allowed=verdict.allowed,
                engine=verdict.engine,
                istio=istio,
                rego=rego,
                rego_decision=trace.rego_decision,
            ),
            error=verdict.error,
            rego_decision=trace.rego_decision,
            rego_result=rego_provider.summary(rego.decision) if rego else None,
            rego_enforced=rego.enforced if rego else None,
            rego_error=rego_provider.error(rego.decision) if rego else None,
            rego_shadow=shadow,
            body_error=rego.body_error if rego else None,
            redacted=redacted,
        )
        return record, snapshot
