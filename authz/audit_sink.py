"""Where decisions go after the response: a sink that never blocks the Check call.

The audit store (a later piece) plugs in behind the same :class:`AuditSink` protocol.
Records never carry tokens, keys or header values beyond what the record lists.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

__all__ = ["AuditSink", "DecisionRecord", "JsonLinesSink", "MemorySink"]

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class DecisionRecord:
    decision_id: str
    time: str  # RFC 3339, UTC
    allowed: bool
    reason: str
    engine: str  # which engine decided: istio, rego, or error (no engine could decide)
    policy_id: str | None
    policy_set_version: str | None
    source_principal: str | None
    source_ip: str | None
    workload_namespace: str | None
    method: str | None
    host: str | None
    path: str | None
    audit_policy_ids: tuple[str, ...] = ()
    dry_run: dict[str, Any] | None = None  # the dry-run dynamic metadata of the response
    error: str | None = None
    # Set when the Rego engine ran for this request. Results are summaries:
    # {"allowed", "reason", "http_status" (on deny)}, never a header value or a body.
    rego_decision: str | None = None  # the decision path, data.envoy.authz.allow
    rego_result: dict[str, Any] | None = None
    rego_enforced: bool | None = None  # False: dry-run (authz.rego.dry_run or its package)
    rego_error: str | None = None  # why there was no usable decision (undefined, ...)
    # The full set's result with the dry-run packages, when it differs from rego_result;
    # also {"dry_run_packages": [...]}.
    rego_shadow: dict[str, Any] | None = None
    body_error: str | None = None  # why input.parsed_body is absent (invalid_json, ...)


class AuditSink(Protocol):
    def submit(self, record: DecisionRecord) -> None:
        """Accept a record without blocking; a full sink drops and counts, never stalls a request."""
        ...


class MemorySink:
    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def submit(self, record: DecisionRecord) -> None:
        self.records.append(record)


class JsonLinesSink:
    """Appends one JSON object per decision to a file, from a background thread.

    ``submit`` only appends to a deque: no lock and no wake-up per record (waking the
    writer for every decision cost more CPU than the decision). The writer drains the
    deque every ``interval`` seconds, one write and one flush per batch; ``close``
    writes what is left.
    """

    def __init__(self, path: Path, *, capacity: int = 100_000, interval: float = 0.05) -> None:
        self.path = path
        self.dropped = 0
        self._capacity = capacity
        self._interval = interval
        self._pending: collections.deque[DecisionRecord] = collections.deque()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-jsonl", daemon=True)
        self._thread.start()

    def submit(self, record: DecisionRecord) -> None:
        if len(self._pending) >= self._capacity:
            self.dropped += 1
        else:
            self._pending.append(record)  # atomic; the writer takes it within `interval`

    def close(self) -> None:
        self._closing.set()
        self._thread.join(10)

    def _run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        encode = json.JSONEncoder(sort_keys=True).encode
        pending = self._pending
        with self.path.open("a", encoding="utf-8") as out:
            while True:
                closing = self._closing.wait(self._interval)
                lines = []
                while pending:
                    lines.append(encode(_as_dict(pending.popleft())) + "\n")
                if lines:
                    out.write("".join(lines))
                    out.flush()
                if closing:
                    return


_FIELDS = tuple(f.name for f in fields(DecisionRecord))


def _as_dict(record: DecisionRecord) -> dict[str, Any]:
    # dataclasses.asdict deep-copies every value; JSON needs none of that (a tuple is
    # written as a list either way), and at ~20 µs a record it was the sink's main cost.
    return {name: getattr(record, name) for name in _FIELDS}
