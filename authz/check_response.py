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

A Rego decision's edits are set as OPA-Envoy (``internal/internal.go``,
``envoyauth/response.go``) sets them: on allow ``headers`` (to the upstream),
``headers_to_remove``, ``response_headers_to_add``, ``query_parameters_to_set`` and
``query_parameters_to_remove``; on deny its status, body and headers. Each header is
a bare key and value (no ``append``). In ``OkHttpResponse.headers`` Envoy reads an
unset ``append`` as false, so the policy's value replaces a header the client sent
(checked through Envoy 1.40 in tests/e2e/test_rego_envoy.py). Rego results that were
not enforced (dry-run) go under ``meshward_rego_dry_run_*`` keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from authz.errors import ResponseBuildError
from authz.istio_engine import IstioDecision, ShadowResult
from authz.rego_decision import RegoDecision

__all__ = [
    "DECISION_ID_HEADER",
    "DENY_BODY",
    "DRY_RUN_ALLOW_PREFIX",
    "DRY_RUN_DENY_PREFIX",
    "REGO_DRY_RUN_PREFIX",
    "allow_response",
    "deny_response",
    "dry_run_metadata",
    "rego_dry_run_metadata",
]

DECISION_ID_HEADER = "x-meshward-decision-id"
DENY_BODY = "RBAC: access denied"
DRY_RUN_ALLOW_PREFIX = "istio_dry_run_allow_"
DRY_RUN_DENY_PREFIX = "istio_dry_run_deny_"
REGO_DRY_RUN_PREFIX = "meshward_rego_dry_run_"
Pair = tuple[str, str]
_HEADER_NAME = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_HEADER_VALUE = re.compile(r"[\x00\r\n]")
_EFFECTIVE_POLICY_ID = "shadow_effective_policy_id"
_ENGINE_RESULT = "shadow_engine_result"


def allow_response(
    *,
    decision_id: str,
    dynamic_metadata: Mapping[str, Any],
    headers: Sequence[Pair] = (),
    headers_to_remove: Sequence[str] = (),
    response_headers_to_add: Sequence[Pair] = (),
    query_parameters_to_set: Sequence[Pair] = (),
    query_parameters_to_remove: Sequence[str] = (),
) -> external_auth_pb2.CheckResponse:
    """OK, with the decision id added to the request that goes upstream.

    The other arguments are a Rego decision's allow-side edits, set as OPA-Envoy sets
    them (see the module docstring).
    """
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[_header(DECISION_ID_HEADER, _checked_id(decision_id))],
        ),
    )
    # Filled only when given: even empty repeated fields cost time on every allow.
    ok = response.ok_response
    if headers:
        ok.headers.extend(_policy(headers))
    if headers_to_remove:
        ok.headers_to_remove.extend(headers_to_remove)
    if response_headers_to_add:
        ok.response_headers_to_add.extend(_policy(response_headers_to_add))
    if query_parameters_to_set:
        ok.query_parameters_to_set.extend(
            base_pb2.QueryParameter(key=key, value=value) for key, value in query_parameters_to_set
        )
    if query_parameters_to_remove:
        ok.query_parameters_to_remove.extend(query_parameters_to_remove)
    _fill_metadata(response, dynamic_metadata)
    return response


def deny_response(
    *,
    decision_id: str,
    body: str = DENY_BODY,
    dynamic_metadata: Mapping[str, Any],
    status: int = http_status_pb2.Forbidden,
    headers: Sequence[Pair] = (),
    content_type: str | None = "text/plain",
) -> external_auth_pb2.CheckResponse:
    """PERMISSION_DENIED, answered to the client as HTTP ``status`` (403) with ``body``.

    ``headers`` are a Rego decision's, after the decision id and ``content_type``
    (None: the policy gave its body and its own content type, or none).
    """
    fixed = [_header(DECISION_ID_HEADER, _checked_id(decision_id))]
    if content_type is not None:
        fixed.append(_header("content-type", content_type))
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=_checked_status(status)),
            headers=[*fixed, *_policy(headers)],
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


def rego_dry_run_metadata(
    *,
    result: RegoDecision | None = None,
    shadow: RegoDecision | None = None,
    packages: Sequence[str] = (),
) -> dict[str, Any]:
    """The ``meshward_rego_dry_run_*`` keys: Rego results that were not enforced.

    ``result`` is the Rego decision when it was not enforced (``authz.rego.dry_run``,
    or the decision's own package is dry-run), ``shadow`` the full set's decision
    with the dry-run packages when it differs from the enforced one; ``packages`` the
    dry-run packages behind either. Empty when neither is given.
    """
    metadata: dict[str, Any] = {}
    if result is not None:
        metadata[REGO_DRY_RUN_PREFIX + "result"] = _verdict(result)
        metadata[REGO_DRY_RUN_PREFIX + "reason"] = result.reason
    if shadow is not None:
        metadata[REGO_DRY_RUN_PREFIX + "shadow_result"] = _verdict(shadow)
        metadata[REGO_DRY_RUN_PREFIX + "shadow_reason"] = shadow.reason
    if metadata and packages:
        metadata[REGO_DRY_RUN_PREFIX + "packages"] = list(packages)
    return metadata


def _verdict(decision: RegoDecision) -> str:
    return "allowed" if decision.allowed else "denied"


def _policy(headers: Sequence[Pair]) -> list[base_pb2.HeaderValueOption]:
    # OPA-Envoy sets key and value only; Envoy then overwrites a header the client sent
    # (ext_authz reads an unset `append` as false). Our decision id is not the policy's.
    return [
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value))
        for key, value in headers
        if _checked_header(key, value).lower() != DECISION_ID_HEADER
    ]


def _checked_header(key: str, value: str) -> str:
    # Envoy refuses a whole CheckResponse over one header it cannot send, and the client
    # then gets a 500 (or, with failure_mode_allow, the request goes through): a header
    # a policy built from request data must fail closed here instead, naming the header.
    if not _HEADER_NAME.fullmatch(key):
        raise ResponseBuildError(
            "bad_decision", f"header name {key!r} is not an HTTP token (RFC 9110)"
        )
    if _BAD_HEADER_VALUE.search(value):
        raise ResponseBuildError(
            "bad_decision", f"the value of header {key!r} holds a NUL, CR or LF character"
        )
    return key


def _checked_status(status: int) -> int:
    # An unknown enum value would be sent as a number Envoy does not know and answered
    # as a 500 by the client's proxy; the Rego decision is validated against the same
    # enum, so this only catches a caller's mistake.
    if status not in http_status_pb2.StatusCode.values() or status == 0:
        raise ResponseBuildError(
            "invalid_http_status", f"HTTP status {status} is not one Envoy can send"
        )
    return status


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
