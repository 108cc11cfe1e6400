"""Decision → Envoy ``CheckResponse``: the output edge of ext_authz, pure.

A denial looks like Istio's RBAC filter's: HTTP 403, body ``RBAC: access denied``,
``content-type: text/plain``. Every response carries ``x-meshward-decision-id``
(to the upstream on allow, to the client on deny) so a user can look the decision
up in the audit trail.

Dry-run results use the dynamic metadata keys of Istio's RBAC filters: Istio sets
``shadow_rules_stat_prefix`` to ``istio_dry_run_allow_`` / ``istio_dry_run_deny_``
and Envoy's RBAC filter prefixes its ``shadow_effective_policy_id`` and
``shadow_engine_result`` fields with it. The result is ``"allowed"`` or
``"denied"``; the policy id only appears when a dry-run rule matched, as in Envoy.
Envoy files ext_authz metadata under the ext_authz filter's own namespace
(``envoy.filters.http.ext_authz``), not ``envoy.filters.http.rbac``: access-log and
tracing configs must use that namespace with the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.errors import ResponseBuildError
from authz.istio_engine import IstioDecision, ShadowResult

__all__ = [
    "DECISION_ID_HEADER",
    "DENY_BODY",
    "DRY_RUN_ALLOW_PREFIX",
    "DRY_RUN_DENY_PREFIX",
    "allow_response",
    "deny_response",
    "dry_run_metadata",
]

DECISION_ID_HEADER = "x-meshward-decision-id"
DENY_BODY = "RBAC: access denied"
DRY_RUN_ALLOW_PREFIX = "istio_dry_run_allow_"
DRY_RUN_DENY_PREFIX = "istio_dry_run_deny_"
_EFFECTIVE_POLICY_ID = "shadow_effective_policy_id"
_ENGINE_RESULT = "shadow_engine_result"


def allow_response(
    *, decision_id: str, dynamic_metadata: Mapping[str, Any]
) -> external_auth_pb2.CheckResponse:
    """OK, with the decision id added to the request that goes upstream."""
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(DECISION_ID_HEADER, _checked_id(decision_id))],
        ),
    )
    _fill_metadata(response, dynamic_metadata)
    return response


def deny_response(
    *,
    decision_id: str,
    body: str = DENY_BODY,
    dynamic_metadata: Mapping[str, Any],
) -> external_auth_pb2.CheckResponse:
    """PERMISSION_DENIED, answered to the client as HTTP 403 with ``body``."""
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Forbidden),
            headers=[
                _header(DECISION_ID_HEADER, _checked_id(decision_id)),
                _header("content-type", "text/plain"),
            ],
            body=body,
        ),
    )
    _fill_metadata(response, dynamic_metadata)
    return response


def dry_run_metadata(decision: IstioDecision) -> dict[str, str]:
    """Istio's dry-run dynamic metadata for ``decision``; empty without dry-run."""
    metadata: dict[str, str] = {}
    _add_shadow(metadata, DRY_RUN_ALLOW_PREFIX, decision.dry_run_allow)
    _add_shadow(metadata, DRY_RUN_DENY_PREFIX, decision.dry_run_deny)
    return metadata


def _add_shadow(metadata: dict[str, str], prefix: str, shadow: ShadowResult | None) -> None:
    if shadow is None:
        return
    metadata[prefix + _ENGINE_RESULT] = "allowed" if shadow.allowed else "denied"
    if shadow.effective_policy_id is not None:
        metadata[prefix + _EFFECTIVE_POLICY_ID] = shadow.effective_policy_id


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    # Overwrite rather than append: a client must not be able to send its own
    # decision id and have ours added next to it.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _checked_id(decision_id: str) -> str:
    # Envoy drops a response whose header value is invalid, which would turn a
    # decision into a 500; refuse such an id here, where the cause is clear.
    if not decision_id or not decision_id.isascii() or not decision_id.isprintable():
        raise ResponseBuildError(
            "invalid_decision_id", f"decision id {decision_id!r} is not a printable ASCII token"
        )
    return decision_id


def _fill_metadata(
    response: external_auth_pb2.CheckResponse, dynamic_metadata: Mapping[str, Any]
) -> None:
    if not dynamic_metadata:
        return
    struct = struct_pb2.Struct()
    try:
        struct.update(dynamic_metadata)
    except (ValueError, TypeError) as exc:
        raise ResponseBuildError(
            "invalid_dynamic_metadata", f"dynamic metadata is not JSON-like: {exc}"
        ) from exc
    response.dynamic_metadata.CopyFrom(struct)
