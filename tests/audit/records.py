"""Decision records for audit tests: varied enough to exercise every column and filter."""

from __future__ import annotations

from typing import Any

from audit.record import DecisionRecord

BASE_US = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z


def make_record(n: int, **fields: Any) -> DecisionRecord:
    """Record ``n``: a minute apart, every third one denied, principals and paths cycling."""
    allowed = n % 3 != 0
    values: dict[str, Any] = {
        "decision_id": f"{n:032x}",
        "time_us": BASE_US + n * 60_000_000,
        "allowed": allowed,
        "reason": "allowed_by_policy" if allowed else "denied_by_policy",
        "engine": "istio",
        "status": None if allowed else 403,
        "policy": "default.reviews-viewer" if allowed else "istio-system.deny-debug",
        "rule": 0,
        "policy_id": "default.reviews-viewer[rules[0]]"
        if allowed
        else "istio-system.deny-debug[rules[0]]",
        "policy_set_version": "v1",
        "latency_us": 40 + n % 7,
        "source_principal": f"example.org/ns/default/sa/client{n % 4}",
        "source_namespace": "default",
        "source_ip": "10.0.0.2",
        "destination_namespace": "default",
        "destination_workload": "reviews",
        "destination_service": "reviews",
        "destination_labels": {"app": "reviews", "version": "v1"},
        "destination_port": 9080,
        "method": "GET",
        "host": "reviews",
        "path": f"/reviews/{n}",
    }
    values.update(fields)
    return DecisionRecord(**values)
