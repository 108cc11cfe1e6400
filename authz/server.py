"""``envoy.service.auth.v3.Authorization/Check`` for grpc.aio: view → engines → response.

Fails closed: any error while deciding answers PERMISSION_DENIED with a named reason,
counted in ``meshward_authz_decisions_total{result,reason}`` and recorded in the audit
sink like any other decision. The audit hand-off never blocks the response.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from prometheus_client import CollectorRegistry, Counter

from authz.audit_sink import AuditSink, DecisionRecord
from authz.check_request import build_view
from authz.check_response import allow_response, deny_response, dry_run_metadata
from authz.errors import AuthzError
from authz.istio_engine import evaluate
from authz.policy_store import PolicyStore
from authz.request_view import RequestView

__all__ = ["DENY_BODY", "AuthorizationServicer"]

log = logging.getLogger(__name__)
DENY_BODY = "RBAC: access denied"  # Istio's body, so clients and dashboards see the familiar text


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        store: PolicyStore,
        sink: AuditSink,
        registry: CollectorRegistry,
        explain_denials: bool = False,
    ) -> None:
        self._store = store
        self._sink = sink
        self._explain = explain_denials
        self.decisions = Counter(
            "meshward_authz_decisions",
            "ext_authz decisions, by result and the reason that decided them",
            ["result", "reason"],
            registry=registry,
        )

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return self.decide(request)

    def decide(self, request: external_auth_pb2.CheckRequest) -> Any:
        """The whole decision, synchronous and without I/O (the audit sink only queues)."""
        decision_id = uuid.uuid4().hex
        view: RequestView | None = None
        served = self._store.current
        try:
            view = build_view(request)
            if served is None:
                return self._deny(
                    decision_id, "no_policy_set", view, None, error="no policy set loaded"
                )
            decision = evaluate(served.istio, view)
            metadata = dry_run_metadata(decision)
            if decision.custom_provider is not None:
                # The Rego provider is not wired in yet: a CUSTOM match must not slip through.
                return self._deny(
                    decision_id,
                    "custom_provider_unavailable",
                    view,
                    served.version,
                    policy_id=decision.custom_policy_id,
                    metadata=metadata,
                    error=f"CUSTOM provider {decision.custom_provider!r} is not available",
                )
            record = self._record(
                decision_id,
                allowed=decision.allowed,
                reason=decision.reason,
                engine="istio",
                view=view,
                version=served.version,
                policy_id=decision.policy_id,
                audit_ids=decision.audit_policy_ids,
                dry_run=metadata or None,
            )
            self._finish(record)
            if decision.allowed:
                return allow_response(decision_id=decision_id, dynamic_metadata=metadata)
            body = DENY_BODY + (
                f" by {decision.policy_id}" if self._explain and decision.policy_id else ""
            )
            return deny_response(decision_id=decision_id, body=body, dynamic_metadata=metadata)
        except AuthzError as exc:
            reason = str(getattr(exc, "reason", "request_parse_error"))
            return self._deny(
                decision_id, reason, view, served.version if served else None, error=str(exc)
            )
        except Exception as exc:
            log.exception("authz: decision %s failed", decision_id)
            return self._deny(
                decision_id,
                "internal_error",
                view,
                served.version if served else None,
                error=repr(exc),
            )

    def _deny(
        self,
        decision_id: str,
        reason: str,
        view: RequestView | None,
        version: str | None,
        *,
        policy_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> Any:
        record = self._record(
            decision_id,
            allowed=False,
            reason=reason,
            engine="error" if error else "istio",
            view=view,
            version=version,
            policy_id=policy_id,
            error=error,
            dry_run=metadata or None,
        )
        self._finish(record)
        return deny_response(
            decision_id=decision_id, body=DENY_BODY, dynamic_metadata=metadata or {}
        )

    def _record(
        self,
        decision_id: str,
        *,
        allowed: bool,
        reason: str,
        engine: str,
        view: RequestView | None,
        version: str | None,
        policy_id: str | None,
        audit_ids: tuple[str, ...] = (),
        dry_run: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> DecisionRecord:
        return DecisionRecord(
            decision_id=decision_id,
            time=datetime.now(UTC).isoformat(),
            allowed=allowed,
            reason=reason,
            engine=engine,
            policy_id=policy_id,
            policy_set_version=version,
            source_principal=view.source_principal if view else None,
            source_ip=view.source_ip if view else None,
            workload_namespace=view.workload_namespace if view else None,
            method=view.method if view else None,
            host=view.host if view else None,
            path=view.path_without_query if view else None,
            audit_policy_ids=audit_ids,
            dry_run=dry_run,
            error=error,
        )

    def _finish(self, record: DecisionRecord) -> None:
        self.decisions.labels("allow" if record.allowed else "deny", record.reason).inc()
        self._sink.submit(record)
