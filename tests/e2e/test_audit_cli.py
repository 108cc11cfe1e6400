"""`meshward audit query|tail|explain|ship` against a real `meshward audit` and store."""

from __future__ import annotations

import json
from pathlib import Path

from audit.record import DecisionRecord
from audit.spool import SpoolWriter
from tests.audit.decided import decide_into_store
from tests.audit.records import make_record
from tests.e2e.audit_trail import AuditTrail
from tests.e2e.processes import free_port, run_cli, running_audit

POLICIES = Path(__file__).parents[2] / "policies"


def test_query_tail_and_explain(tmp_path: Path) -> None:
    records = decide_into_store(POLICIES, tmp_path / "data")
    with running_audit(tmp_path / "data", tmp_path / "audit.log") as audit:
        url = ["--audit-url", audit.url]
        table = run_cli("audit", "query", "--denied", "--workload", "ratings", *url).ok().stdout
        lines = table.splitlines()
        assert lines[0].split() == [
            "TIME",
            "DECISION",
            "OUTCOME",
            "SOURCE",
            "DESTINATION",
            "REQUEST",
            "DECIDED",
            "BY",
        ]
        denied = [r for r in records if not r.allowed and r.destination_workload == "ratings"]
        assert len(lines) == 1 + len(denied)
        assert all(
            "deny 403" in line and "default.ratings-deny-writes" in line for line in lines[1:]
        )
        limited = run_cli("audit", "query", "--limit", "3", "--output", "json", *url).json()
        assert [d["decision_id"] for d in limited] == [r.decision_id for r in records[::-1][:3]]
        # tail from a time in the past: the oldest first, then it would wait for more.
        followed = run_cli(
            "audit", "tail", "--since", "1h", "--count", "5", "--output", "json", *url
        ).ok()
        got = [json.loads(line)["decision_id"] for line in followed.stdout.splitlines()]
        assert got == [r.decision_id for r in records[:5]]
        first = records[0]
        explained = run_cli("audit", "explain", first.decision_id, *url).ok().stdout
        assert f"decision   {first.decision_id}" in explained
        assert "ALLOW            default.reviews-viewer" in explained
        assert "the same as recorded" in explained
        missing = run_cli("audit", "explain", "nope", *url)
        assert missing.returncode == 1
        assert "no decision nope" in missing.stderr
        bad = run_cli("audit", "query", "--since", "yesterday", *url)
        assert bad.returncode == 1
        assert "since='yesterday' is not a time" in bad.stderr
        assert "Traceback" not in bad.stderr
    down = run_cli("audit", "query", "--audit-url", f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 1
    assert "cannot reach the audit API" in down.stderr


def test_ship_once_drains_the_spool_of_an_authz_that_is_gone(tmp_path: Path) -> None:
    data = tmp_path / "data"
    writer = SpoolWriter(data / "audit" / "spool")
    sent: list[DecisionRecord] = [make_record(i) for i in range(25)]
    for record in sent:
        writer.submit(record)
    writer.close()
    run_cli("audit", "ship", "--once", "--data-dir", data).ok()
    stored = AuditTrail(data).records()
    assert [r["decision_id"] for r in stored] == [r.decision_id for r in sent]
    # Again: nothing new, nothing twice.
    run_cli("audit", "ship", "--once", "--data-dir", data).ok()
    assert len(AuditTrail(data).records()) == 25
