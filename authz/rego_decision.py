"""A Rego decision value → ``RegoDecision``, as OPA-Envoy reads it (pure).

OPA-Envoy (``envoyauth/response.go``, ``internal/internal.go``) accepts:

- a boolean: ``true`` allows, ``false`` denies with 403;
- an object with a boolean ``allowed`` and, depending on it:

  ============================= ======= ====== ==========================================
  key                           allow   deny   type
  ============================= ======= ====== ==========================================
  ``headers``                   yes     yes    object of string or [string], or a list
                                               of such objects (to upstream on allow,
                                               to the client on deny)
  ``request_headers_to_remove`` yes            [string]
  ``response_headers_to_add``   yes            like ``headers`` (to the client)
  ``query_parameters_to_set``   yes            object of string or [string]
  ``query_parameters_to_remove`` yes           [string]
  ``body``                             yes     string
  ``http_status``                      yes     integer Envoy and Go both know (403)
  ``dynamic_metadata``          yes     yes    object
  ============================= ======= ====== ==========================================

Like OPA-Envoy, only the keys of the branch taken are read and other keys are
ignored. Anything else fails closed: a denial whose ``reason`` says why
(``undefined``, ``eval_error``, ``timeout`` from evaluation, ``bad_decision`` for a
value of the wrong shape) and whose ``detail`` names the key at fault. Dry-run is
reported, not applied: the caller decides what an un-enforced decision means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from authz.rego_engine import RegoResult

__all__ = [
    "ALLOWED",
    "BAD_DECISION",
    "DEFAULT_DENY_STATUS",
    "DENIED",
    "FAILURE_REASONS",
    "HTTP_STATUSES",
    "RegoDecision",
    "interpret",
]

ALLOWED = "allowed_by_policy"
DENIED = "denied_by_policy"
BAD_DECISION = "bad_decision"
FAILURE_REASONS = frozenset({"undefined", "eval_error", "timeout", BAD_DECISION})
DEFAULT_DENY_STATUS = 403

# OPA-Envoy takes a status only if Go's http.StatusText knows it and it is in Envoy's
# envoy.type.v3.StatusCode; that intersection is Envoy's enum without 0 ("Empty").
HTTP_STATUSES: Final = frozenset(
    {100, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226}
    | {300, 301, 302, 303, 304, 305, 307, 308}
    | set(range(400, 418))
    | {421, 422, 423, 424, 426, 428, 429, 431}
    | {500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511}
)

Pair = tuple[str, str]


@dataclass(slots=True, frozen=True)
class RegoDecision:
    """What the Rego policy decided for one request, ready to become a CheckResponse.

    ``reason`` is ``allowed_by_policy`` / ``denied_by_policy`` when the policy
    decided, else one of ``FAILURE_REASONS`` (and ``allowed`` is False). ``headers``
    go upstream on allow and to the client on deny, in order, repeated keys kept.
    ``http_status`` is set on deny; ``body`` is None when the policy gave none (a
    boolean decision), so the caller can keep its own default body.
    """

    allowed: bool
    reason: str
    decision: str
    detail: str = ""
    dry_run: bool = False
    http_status: int | None = None
    headers: tuple[Pair, ...] = ()
    body: str | None = None
    request_headers_to_remove: tuple[str, ...] = ()
    response_headers_to_add: tuple[Pair, ...] = ()
    query_parameters_to_set: tuple[Pair, ...] = ()
    query_parameters_to_remove: tuple[str, ...] = ()
    dynamic_metadata: Mapping[str, Any] | None = None


class _BadDecision(Exception):
    pass


def interpret(result: RegoResult) -> RegoDecision:
    """Map one evaluation result to a decision; never raises."""
    if not result.defined:
        return _deny(result, result.error or "eval_error", result.detail)
    value = result.value
    if isinstance(value, bool):
        if value:
            return RegoDecision(True, ALLOWED, result.decision, dry_run=result.dry_run)
        return RegoDecision(
            False,
            DENIED,
            result.decision,
            dry_run=result.dry_run,
            http_status=DEFAULT_DENY_STATUS,
        )
    if not isinstance(value, dict):
        return _deny(
            result,
            BAD_DECISION,
            f"the decision is {_kind(value)}; it must be a boolean or an object with "
            "a boolean `allowed`",
        )
    try:
        return _structured(result, value)
    except _BadDecision as exc:
        return _deny(result, BAD_DECISION, str(exc))


def _structured(result: RegoResult, value: Mapping[str, Any]) -> RegoDecision:
    if "allowed" not in value:
        raise _BadDecision("the decision object has no `allowed` key")
    allowed = value["allowed"]
    if not isinstance(allowed, bool):
        raise _BadDecision(f"`allowed` must be a boolean, not {_kind(allowed)}")
    headers = _headers(value, "headers")
    metadata = value.get("dynamic_metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _BadDecision(f"`dynamic_metadata` must be an object, not {_kind(metadata)}")
    if allowed:
        return RegoDecision(
            True,
            ALLOWED,
            result.decision,
            dry_run=result.dry_run,
            headers=headers,
            request_headers_to_remove=_strings(value, "request_headers_to_remove"),
            response_headers_to_add=_headers(value, "response_headers_to_add"),
            query_parameters_to_set=_query_parameters(value),
            query_parameters_to_remove=_strings(value, "query_parameters_to_remove"),
            dynamic_metadata=metadata,
        )
    body = value.get("body")
    if "body" in value and not isinstance(body, str):
        raise _BadDecision(f"`body` must be a string, not {_kind(body)}")
    return RegoDecision(
        False,
        DENIED,
        result.decision,
        dry_run=result.dry_run,
        http_status=_http_status(value),
        headers=headers,
        body=body,
        dynamic_metadata=metadata,
    )


def _deny(result: RegoResult, reason: str, detail: str) -> RegoDecision:
    return RegoDecision(
        False,
        reason,
        result.decision,
        detail=detail,
        dry_run=result.dry_run,
        http_status=DEFAULT_DENY_STATUS,
    )


def _http_status(value: Mapping[str, Any]) -> int:
    if "http_status" not in value:
        return DEFAULT_DENY_STATUS
    status = value["http_status"]
    # OPA-Envoy reads a JSON number as an integer: 403.0 and "403" are refused.
    if isinstance(status, bool) or not isinstance(status, int):
        raise _BadDecision(f"`http_status` must be an integer, not {_kind(status)}")
    if status not in HTTP_STATUSES:
        raise _BadDecision(
            f"`http_status` {status} is not an HTTP status Envoy accepts (e.g. 401, 403, 429, 503)"
        )
    return status


def _headers(value: Mapping[str, Any], key: str) -> tuple[Pair, ...]:
    if key not in value:
        return ()
    raw = value[key]
    maps = raw if isinstance(raw, list) else [raw]
    out: list[Pair] = []
    for i, headers in enumerate(maps):
        where = f"{key}[{i}]" if isinstance(raw, list) else key
        if not isinstance(headers, dict):
            raise _BadDecision(f"`{where}` must be an object of headers, not {_kind(headers)}")
        out.extend(_pairs(headers, where))
    return tuple(out)


def _query_parameters(value: Mapping[str, Any]) -> tuple[Pair, ...]:
    key = "query_parameters_to_set"
    if key not in value:
        return ()
    raw = value[key]
    if not isinstance(raw, dict):
        raise _BadDecision(f"`{key}` must be an object, not {_kind(raw)}")
    return tuple(_pairs(raw, key))


def _pairs(mapping: Mapping[str, Any], where: str) -> list[Pair]:
    out: list[Pair] = []
    for name, item in mapping.items():
        if isinstance(item, str):
            out.append((name, item))
        elif isinstance(item, list):
            out.extend((name, v) for v in _string_items(item, f"{where}.{name}"))
        else:
            raise _BadDecision(
                f"`{where}.{name}` must be a string or a list of strings, not {_kind(item)}"
            )
    return out


def _strings(value: Mapping[str, Any], key: str) -> tuple[str, ...]:
    if key not in value:
        return ()
    raw = value[key]
    if not isinstance(raw, list):
        raise _BadDecision(f"`{key}` must be a list of strings, not {_kind(raw)}")
    return tuple(_string_items(raw, key))


def _string_items(items: list[Any], where: str) -> list[str]:
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise _BadDecision(f"`{where}[{i}]` must be a string, not {_kind(item)}")
    return items


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"
