"""Why a recorded decision was made: its stored request against the set that decided it.

``meshward audit explain DECISION_ID`` (and the page's decision view). The record says
what was decided; this re-runs the pure engines on the stored request snapshot with
the policy set of the record's version (kept in the audit trail when it was first
served) to show what the record leaves out: every AuthorizationPolicy that applied to
the workload and the first rule of each that matched, the Istio verdict and its
dry-run shadows, and the Rego decision (its path, package and value). It also says
whether the re-evaluation reproduces the recorded outcome (verdict, reason and
status): it may not when the decision depended on the time, and it cannot when the
policies read something the trail does not keep (a redacted header, the body, a
redacted query value; the test replay applies). The stored request then lacks the
value or holds a keyed hash of it, the Rego value and the re-evaluation shown are of
that request, and ``reevaluated.not_reevaluable`` says why they are not the decision's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.message import DecodeError

from audit.request_document import request_document
from audit.sink import MemorySink
from authz.check_request import build_view
from authz.decision_trace import istio_summary, istio_trace, rego_trace
from authz.errors import AuthzError
from authz.policy_store import ServedPolicies
from authz.rego_provider import RegoSettings
from authz.replay import UNLOGGED_HEADERS, Decider, dependencies

__all__ = ["explain"]


def explain(
    record: Mapping[str, Any],
    served: ServedPolicies | None,
    *,
    servicer: Decider | None,
    sink: MemorySink | None,
    rego: RegoSettings,
    root: Path | None = None,
) -> dict[str, Any]:
    """The explanation of ``record`` (with ``request``: the snapshot bytes or None).

    ``served`` is the record's policy set, loaded from the trail (None: not kept) out of
    the directory ``root`` (files are named relative to it); ``servicer`` and ``sink``
    decide with it, as ``meshward authz`` would.
    """
    blob = record.get("request")
    decision = {k: v for k, v in record.items() if k != "request"}
    out: dict[str, Any] = {
        "decision": decision,
        "request": request_document(blob),
        "policy_set": {
            "version": record.get("policy_set_version"),
            "kept": served is not None,
            "files": [path for path, _ in served.sources] if served else [],
        },
        "notes": [],
    }
    notes: list[str] = out["notes"]
    redacted = [r for r in record.get("redacted") or () if not r.startswith(UNLOGGED_HEADERS)]
    logged = [r for r in record.get("redacted") or () if r.startswith(UNLOGGED_HEADERS)]
    if redacted:
        notes.append(
            "not kept in the trail, and so evaluated as their redacted hash: " + ", ".join(redacted)
        )
    for marker in logged:
        carried = marker.removeprefix(UNLOGGED_HEADERS).removeprefix(":")
        notes.append(
            "Envoy decided this request and its access log carried only these headers: "
            + (carried.replace(",", ", ") or "none")
            + "; a policy reading another header cannot be evaluated again"
        )
    if served is None:
        notes.append(
            "this decision names no policy set: Envoy's RBAC filters decided it with a chain "
            "that no policy set authz served made (the Envoy was not updated yet)"
            if record.get("policy_set_version") is None and record.get("engine") == "envoy-rbac"
            else "the policy set that made this decision is not in the audit trail (recorded "
            "before it kept policy sets, or too large to keep)"
        )
        notes[-1] += ": only the record is shown"
        return out
    if not blob:
        notes.append("no request snapshot was stored with this decision: only the record is shown")
        return out
    try:
        check = external_auth_pb2.CheckRequest.FromString(blob)
    except DecodeError:
        notes.append("the stored request snapshot does not decode")
        return out
    try:
        view = build_view(check)
    except AuthzError as exc:
        notes.append(f"the request was refused before any engine ran: {exc}")
        return out
    matches, istio = istio_trace(served.istio, view)
    policies = [m.as_dict() for m in matches]
    if root is not None:
        for match in policies:
            match["file"] = str(Path(match["file"]).relative_to(root))
    out["istio"] = {**istio_summary(istio), "policies": policies}
    out["rego"] = None
    if served.rego is not None and record.get("rego_decision") is not None:
        out["rego"] = rego_trace(
            served.rego,
            check,
            view,
            parse_body=rego.parse_body,
            max_body_bytes=rego.max_body_bytes,
        ).as_dict()
    if servicer is not None and sink is not None:
        sink.records.clear()
        servicer.decide(check)
        (again,) = sink.records
        rego_ran = again.rego_decision is not None or record.get("rego_decision") is not None
        why = dependencies(served).reason_not_reevaluable(
            record.get("redacted") or (), rego=rego_ran
        )
        out["reevaluated"] = {
            "allowed": again.allowed,
            "reason": again.reason,
            "status": again.status,
            "engine": again.engine,
            "policy_id": again.policy_id,
            "reproduced": why is None
            and again.allowed == bool(record.get("allowed"))
            and again.reason == record.get("reason")
            and again.status == record.get("status"),
            "not_reevaluable": why,
        }
        if why is not None:
            notes.append(
                f"this decision cannot be made again from the trail: {why}. The stored "
                "request lacks that value (or holds a keyed hash of it), and what is evaluated "
                "here is the stored request, not the one decided"
            )
        elif not out["reevaluated"]["reproduced"]:
            notes.append(
                "evaluating the stored request again does not give the recorded decision: "
                "it depended on the time, or on something not kept (see redacted)"
            )
    return out
