"""The audit record: one authorization decision, whichever engine made it.

A producer (the ext_authz server today; decisions Envoy's own RBAC filter enforced,
reported over the access-log service, later) fills one :class:`DecisionRecord` per
decision and hands it, with the request snapshot it may re-evaluate later, to an
:class:`audit.sink.AuditSink`.

What a record never holds: header values of ``authorization``, ``cookie``,
``set-cookie``, ``proxy-authorization`` or any configured header, query values of
configured parameters, bodies (unless configured), a Rego decision's header values
or body. ``redacted`` says what the stored request lacks, so that a replay knows
what it cannot re-evaluate (see :mod:`audit.redaction`).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "FLIP_TO_ALLOW",
    "FLIP_TO_DENY",
    "DecisionRecord",
    "new_decision_id",
    "split_policy_id",
]

FLIP_TO_DENY = "deny"
FLIP_TO_ALLOW = "allow"


# Not slots=True, unlike the project's other values: the spool encodes a record on the
# Check path, and orjson writes an instance's __dict__ in one pass but a slotted one
# field by field (the same bytes; here 5 µs instead of 10 inside a decision).
@dataclass(frozen=True)
class DecisionRecord:
    """One decision as the audit trail keeps it.

    ``status`` is the HTTP status meshward's denial sent (403, or a Rego policy's own);
    None on allow: ext_authz answers before the upstream does, so only a producer that
    sees the response (Envoy's access log) could fill it. ``policy`` is what decided: an
    Istio policy ``ns.name`` (``rule`` its rule index, ``policy_id`` Istio's
    ``ns.name[rules[i]]``) or a Rego decision path. ``dry_run_flips`` lists every
    dry-run policy (Istio dry-run ALLOW/DENY, Rego staged packages or global dry-run)
    that would have changed the outcome: ``{"engine", "policy", "to": "deny"|"allow"}``.
    """

    decision_id: str
    time_us: int  # microseconds since the epoch, UTC
    allowed: bool
    reason: str
    engine: str  # which engine decided: istio, rego, or error (no engine could decide)
    status: int | None = None
    policy: str | None = None
    rule: int | None = None
    policy_id: str | None = None
    policy_set_version: str | None = None
    latency_us: int | None = None  # from the CheckRequest's arrival to the answer
    source_principal: str | None = None  # SPIFFE ID without spiffe://, as Istio writes it
    source_namespace: str | None = None
    source_ip: str | None = None
    request_principal: str | None = None  # iss/sub of the JWT Envoy verified
    destination_namespace: str | None = None
    destination_workload: str | None = None  # the workload's canonical name (app label)
    destination_service: str | None = None
    destination_labels: Mapping[str, str] = field(default_factory=dict)
    destination_port: int | None = None
    sni: str | None = None
    method: str | None = None
    host: str | None = None
    path: str | None = None  # without the query, which may carry a token
    audit_policy_ids: tuple[str, ...] = ()
    dry_run: Mapping[str, Any] | None = None  # the dry-run results, as in the response metadata
    dry_run_flips: tuple[Mapping[str, str], ...] = ()
    error: str | None = None
    # Set when the Rego engine ran for this request. Results are summaries:
    # {"allowed", "reason", "http_status" (on deny)}, never a header value or a body.
    rego_decision: str | None = None  # the decision path, data.envoy.authz.allow
    rego_result: Mapping[str, Any] | None = None
    rego_enforced: bool | None = None  # False: dry-run (authz.rego.dry_run or its package)
    rego_error: str | None = None  # why there was no usable decision (undefined, ...)
    # The full set's result with the dry-run packages, when it differs from rego_result;
    # also {"dry_run_packages": [...]}.
    rego_shadow: Mapping[str, Any] | None = None
    body_error: str | None = None  # why input.parsed_body is absent (invalid_json, ...)
    redacted: tuple[str, ...] = ()  # header:NAME, query:NAME, body: left out of the request

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.time_us / 1e6, UTC)

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _FIELDS}
        out["destination_labels"] = dict(self.destination_labels)
        out["audit_policy_ids"] = list(self.audit_policy_ids)
        out["dry_run_flips"] = [dict(f) for f in self.dry_run_flips]
        out["redacted"] = list(self.redacted)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecisionRecord:
        """The record of ``as_dict`` (or of a spool line); unknown keys are ignored.

        Records written by an older or newer meshward keep loading: a field added
        later has a default, a field removed is dropped.
        """
        values = {name: data[name] for name in _FIELDS if name in data}
        for name in _TUPLES:
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(DecisionRecord))
_TUPLES = ("audit_policy_ids", "dry_run_flips", "redacted")


def new_decision_id() -> str:
    """32 hex digits laid out as a UUIDv7: the time in ms, then 80 random bits.

    Time-ordered on purpose: the store's index on decision_id then grows at its end,
    as a time index does, instead of every insert landing on a random page (which on
    a large store is a page written, and often one read, per decision).
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(10)}"


def split_policy_id(policy_id: str | None) -> tuple[str | None, int | None]:
    """``ns.name[rules[2]]`` → (``ns.name``, 2); anything else is a policy without a rule."""
    if policy_id is None:
        return None, None
    name, sep, rest = policy_id.partition("[rules[")
    if sep and rest.endswith("]]") and rest[:-2].isdigit():
        return name, int(rest[:-2])
    return policy_id, None
