"""Recorded requests re-evaluated against a candidate policy set: which decisions flip.

Each recorded request snapshot is decided again by a servicer of the candidate (the
same engines, loader and settings ``meshward authz`` serves with: the caller loads one
:class:`Candidate` per set of authz settings the decisions were recorded under) and
compared with the recorded outcome. Flips are grouped by direction, the policy (or
reason) that decides the difference, and the caller.

A request is not re-evaluated, only counted (by reason), when the verdict could depend
on something the audit trail did not keep:

- no snapshot was stored (recorded before snapshots existed, or the snapshot failed);
- a header the record redacted is read by the candidate: an Istio ``when`` on
  ``request.headers[NAME]``, a Rego module that names the header, or a Rego module that
  reads headers without spelling out which (``headers[name]``, ``object.get(headers, …)``,
  the headers object kept in a variable): its value would otherwise be the
  ``redacted:`` hash, a guess;
- the snapshot holds only some headers (:data:`UNLOGGED_HEADERS`: a decision Envoy's
  RBAC filter made, known from its access log) and the candidate reads any header (an
  Istio ``request.headers[…]``, a Rego module that reads headers): an absent header
  would be a guess too;
- the body was not kept (or cut) and a Rego module reads a body;
- a redacted query value and a Rego module that reads the query, or the raw path
  (``input.attributes.request.http.path`` and ``:path`` hold the query too);
- the caller could not tell which settings it was decided under (:meth:`Replay.skip`).

Names are looked up in the modules' text, comments included: a module that mentions a
redacted header anywhere is taken to read it. Counting too much is the safe side;
a false flip is not.

Rego only matters for requests the candidate sends to Rego (a CUSTOM match, or mode
``always``): a decision Istio makes alone is re-evaluated whatever Rego could read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError

from audit.record import DecisionRecord
from audit.sink import MemorySink
from authz.istio_policy import Attribute, PolicySet
from authz.policy_store import ServedPolicies
from authz.rego_scan import request_reads

__all__ = [
    "ALLOW_TO_DENY",
    "DENY_TO_ALLOW",
    "UNLOGGED_HEADERS",
    "Candidate",
    "Dependencies",
    "Replay",
    "dependencies",
    "logged_headers_marker",
    "report_text",
]

ALLOW_TO_DENY = "allow_to_deny"
DENY_TO_ALLOW = "deny_to_allow"
# In ``redacted``: the stored request has only the headers Envoy's access log carried,
# ``header:*`` alone (older records) or followed by their names: ``header:*:a,b``.
UNLOGGED_HEADERS = "header:*"


def logged_headers_marker(present: Iterable[str]) -> str:
    """The ``redacted`` item of a request whose headers are only ``present``."""
    return f"{UNLOGGED_HEADERS}:{','.join(sorted(present))}"


class Decider(Protocol):
    def decide(self, request: external_auth_pb2.CheckRequest) -> Any: ...


@dataclass(slots=True, frozen=True)
class Dependencies:
    """What of a request the candidate set may read that the audit trail may redact."""

    istio_headers: frozenset[str]  # request.headers[NAME] in any policy, lowercase
    rego_text: str  # every Rego module, lowercased, to look names up in
    rego_any_header: bool = False  # some module reads headers it does not name
    rego_path: bool = False  # some module reads a raw path (query included)

    def reason_not_reevaluable(self, redacted: Iterable[str], *, rego: bool) -> str | None:
        """Why a request with ``redacted`` missing cannot be decided again (None: it can);
        ``rego``: whether the Rego engine takes part in its decision."""
        for item in redacted:
            kind, _, name = item.partition(":")
            if kind == "request":
                return "no request snapshot was stored"
            if item == UNLOGGED_HEADERS or item.startswith(f"{UNLOGGED_HEADERS}:"):
                present = set(item.removeprefix(UNLOGGED_HEADERS).removeprefix(":").split(","))
                unlogged = sorted(self.istio_headers - present)
                if unlogged:
                    return (
                        f"an Istio policy reads header {unlogged[0]}, which Envoy's access "
                        "log did not carry"
                    )
                if rego and (self.rego_any_header or "header" in self.rego_text):
                    return (
                        "a Rego module reads request headers, and only the headers "
                        "Envoy's access log carried are stored"
                    )
                continue
            if kind == "header" and name in self.istio_headers:
                return f"an Istio policy reads header {name}, which is not stored"
            if not rego:
                continue
            if kind == "header" and name in self.rego_text:
                return f"a Rego module reads header {name}, which is not stored"
            if kind == "header" and self.rego_any_header:
                return f"a Rego module reads headers without naming them, and {name} is not stored"
            if kind == "body" and "body" in self.rego_text:
                return (
                    "a Rego module reads the body, which is not stored"
                    if not name
                    else "a Rego module reads the body, which is stored cut short"
                )
            if kind == "query" and ("query" in self.rego_text or (name and name in self.rego_text)):
                return f"a Rego module reads the query, whose {name or 'value'} is not stored"
            if kind == "query" and (self.rego_path or ":path" in self.rego_text):
                return (
                    f"a Rego module reads the path with its query, whose {name or 'value'} "
                    "is not stored"
                )
        return None


def dependencies(served: ServedPolicies) -> Dependencies:
    modules = [
        raw.decode("utf-8", "replace") for path, raw in served.sources if path.endswith(".rego")
    ]
    reads = [request_reads(text) for text in modules]
    return Dependencies(
        istio_headers=_istio_headers(served.istio),
        rego_text="\n".join(text.lower() for text in modules),
        rego_any_header=any(r.any_header for r in reads),
        rego_path=any(r.path for r in reads),
    )


def _istio_headers(policies: PolicySet) -> frozenset[str]:
    names: set[str] = set()
    for policy in policies.policies:
        for rule in policy.rules:
            clauses = [c for group in (*rule.sources, *rule.operations) for c in group]
            for clause in (*clauses, *rule.conditions):
                if clause.attribute is Attribute.HEADER and clause.key:
                    names.add(clause.key[0].lower())
    return frozenset(names)


@dataclass(slots=True)
class _Group:
    direction: str
    policy: str  # what decides the difference: a rule, a policy, or a reason
    principal: str | None
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class Candidate:
    """The candidate set loaded under one set of authz settings, deciding into ``sink``."""

    servicer: Decider
    sink: MemorySink
    served: ServedPolicies


@dataclass(slots=True)
class Replay:
    """Feed recorded decisions with ``add`` (or ``skip``); ``report`` says what flipped.

    ``notes`` are printed with the report (settings that differ from those recorded);
    ``truncated`` says that more decisions matched than were fed.
    """

    directory: str
    version: str | None = None  # the candidate's policy-set version, once one decided
    max_examples: int = 3
    considered: int = 0
    reevaluated: int = 0
    flips: Counter[str] = field(default_factory=Counter)
    not_reevaluable: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    limit: int | None = None
    truncated: bool = False
    _groups: dict[tuple[str, str, str | None], _Group] = field(default_factory=dict)
    _deps: dict[str, Dependencies] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        """Count a recorded decision as not re-evaluable, for ``reason``."""
        self.considered += 1
        self.not_reevaluable[reason] += 1

    def add(self, recorded: Mapping[str, Any], request: bytes | None, candidate: Candidate) -> None:
        """Decide ``recorded``'s request (its snapshot bytes) again with ``candidate``."""
        self.considered += 1
        if not request:
            self.not_reevaluable["no request snapshot was stored"] += 1
            return
        try:
            check = external_auth_pb2.CheckRequest.FromString(request)
        except DecodeError:
            self.not_reevaluable["the request snapshot does not decode"] += 1
            return
        sink = candidate.sink
        sink.records.clear()
        sink.requests.clear()
        candidate.servicer.decide(check)
        (now,) = sink.records
        self.version = candidate.served.version
        deps = self._deps.get(candidate.served.version)
        if deps is None:
            deps = self._deps[candidate.served.version] = dependencies(candidate.served)
        rego = now.rego_decision is not None or recorded.get("rego_decision") is not None
        why = deps.reason_not_reevaluable(recorded.get("redacted") or (), rego=rego)
        if why is not None:
            self.not_reevaluable[why] += 1
            return
        self.reevaluated += 1
        if bool(recorded["allowed"]) == now.allowed:
            return
        direction = DENY_TO_ALLOW if now.allowed else ALLOW_TO_DENY
        self.flips[direction] += 1
        policy = (
            _decided_by(now)
            if direction == ALLOW_TO_DENY
            else str(recorded.get("policy_id") or recorded.get("reason"))
        )
        key = (direction, policy, recorded.get("source_principal"))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(direction, policy, key[2])
        group.count += 1
        if len(group.examples) < self.max_examples:
            group.examples.append(_example(recorded, now))

    def report(self) -> dict[str, Any]:
        groups = sorted(self._groups.values(), key=lambda g: (g.direction, -g.count, g.policy))
        return {
            "policies": self.directory,
            "version": self.version,
            "considered": self.considered,
            "limit": self.limit,
            "truncated": self.truncated,
            "notes": list(self.notes),
            "reevaluated": self.reevaluated,
            "unchanged": self.reevaluated - sum(self.flips.values()),
            "flips": {
                ALLOW_TO_DENY: self.flips[ALLOW_TO_DENY],
                DENY_TO_ALLOW: self.flips[DENY_TO_ALLOW],
            },
            "groups": [
                {
                    "direction": g.direction,
                    "policy": g.policy,
                    "principal": g.principal,
                    "count": g.count,
                    "examples": g.examples,
                }
                for g in groups
            ],
            "not_reevaluable": dict(self.not_reevaluable.most_common()),
        }


def _decided_by(record: DecisionRecord) -> str:
    return record.policy_id or record.reason


def _example(recorded: Mapping[str, Any], now: DecisionRecord) -> dict[str, Any]:
    return {
        "decision_id": recorded["decision_id"],
        "time": recorded.get("time"),
        "method": recorded.get("method"),
        "path": recorded.get("path"),
        "destination": f"{recorded.get('destination_namespace')}/"
        f"{recorded.get('destination_workload')}",
        "was": {
            "allowed": bool(recorded["allowed"]),
            "reason": recorded.get("reason"),
            "policy_id": recorded.get("policy_id"),
            "engine": recorded.get("engine"),
            "status": recorded.get("status"),
        },
        "now": {
            "allowed": now.allowed,
            "reason": now.reason,
            "policy_id": now.policy_id,
            "engine": now.engine,
            "status": now.status,
        },
    }


def report_text(report: Mapping[str, Any]) -> str:
    """The report as ``meshward policy replay`` prints it."""
    flips = report["flips"]
    lines = [
        f"replayed {report['considered']} recorded decisions against {report['policies']} "
        f"(policy set {report['version']})",
        f"  re-evaluated {report['reevaluated']}: {report['unchanged']} unchanged, "
        f"{flips[ALLOW_TO_DENY]} allow→deny, {flips[DENY_TO_ALLOW]} deny→allow",
    ]
    if report.get("truncated"):
        lines.append(
            f"  stopped at the limit of {report['limit']}: more recorded decisions match "
            "(narrow the filters, or raise --limit)"
        )
    lines += [f"  note: {note}" for note in report.get("notes") or ()]
    skipped = report["not_reevaluable"]
    if skipped:
        lines.append(f"  not re-evaluated {sum(skipped.values())}:")
        lines += [f"    {count:>6}  {why}" for why, count in skipped.items()]
    for group in report["groups"]:
        arrow = "allow→deny" if group["direction"] == ALLOW_TO_DENY else "deny→allow"
        verb = "now decided by" if group["direction"] == ALLOW_TO_DENY else "was denied by"
        lines.append("")
        lines.append(
            f"{arrow}  {group['count']} from {group['principal'] or '(no principal)'}, "
            f"{verb} {group['policy']}"
        )
        for ex in group["examples"]:
            lines.append(
                f"    {ex['decision_id']}  {ex['time']}  {ex['method']} {ex['path']} → "
                f"{ex['destination']}  ({ex['was']['reason']} → {ex['now']['reason']}"
                + (f", {ex['now']['policy_id']}" if ex["now"]["policy_id"] else "")
                + ")"
            )
    return "\n".join(lines)
