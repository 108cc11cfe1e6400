"""The JSON-lines audit sink: every record written once, in order; full means dropped."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from authz.audit_sink import DecisionRecord, JsonLinesSink


def record(n: int, **extra: object) -> DecisionRecord:
    fields: dict[str, object] = {
        "decision_id": f"d{n}",
        "time": "2026-11-21T00:00:00+00:00",
        "allowed": n % 2 == 0,
        "reason": "allowed_by_policy",
        "engine": "istio",
        "policy_id": "default.p[rules[0]]",
        "policy_set_version": "v1",
        "source_principal": "example.org/ns/default/sa/web",
        "source_ip": "10.0.0.1",
        "workload_namespace": "default",
        "method": "GET",
        "host": "api",
        "path": "/x",
    }
    fields.update(extra)
    return DecisionRecord(**fields)  # type: ignore[arg-type]


def test_close_writes_every_record_once_in_order_as_asdict_would(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "decisions.jsonl"
    sink = JsonLinesSink(path, interval=60)  # only close() can flush: nothing is lost on exit
    records = [
        record(i, audit_policy_ids=("a", "b"), dry_run={"k": [1, {"x": None}]}) for i in range(500)
    ]
    for r in records:
        sink.submit(r)
    sink.close()
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        json.loads(json.dumps(asdict(r))) for r in records
    ]
    assert sink.dropped == 0


def test_a_full_sink_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    sink = JsonLinesSink(path, capacity=10, interval=60)
    for i in range(25):
        sink.submit(record(i))
    sink.close()
    assert sink.dropped == 15
    assert [json.loads(line)["decision_id"] for line in path.read_text().splitlines()] == [
        f"d{i}" for i in range(10)
    ]


def test_records_reach_the_file_without_close(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    sink = JsonLinesSink(path, interval=0.01)
    try:
        sink.submit(record(1))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (path.exists() and path.read_text()):
            time.sleep(0.01)
        assert json.loads(path.read_text())["decision_id"] == "d1"
    finally:
        sink.close()
