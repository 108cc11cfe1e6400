"""`meshward audit query|tail|explain|ship` and `meshward policy replay` against a real
`meshward audit` and store."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from audit.record import DecisionRecord
from audit.spool import SpoolWriter
from tests.audit.decided import (
    ADMIN_REQUESTS,
    SETTINGS_FLAGS,
    SETTINGS_REQUESTS,
    decide_into_store,
    settings_policies,
)
from tests.audit.records import make_record
from tests.e2e.audit_trail import AuditTrail
from tests.e2e.processes import (
    CLI_DEADLINE,
    MESHWARD,
    cli_env,
    free_port,
    run_cli,
    running_audit,
)

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


def test_replay_uses_the_recorded_settings_and_explain_shows_rego(tmp_path: Path) -> None:
    """`policy replay` on a machine with no config decides each decision under the
    settings it was recorded with (fetched from the API), says when a flag overrides
    them and when --limit cut it short; `audit explain` names the Rego decision."""
    data = tmp_path / "data"
    policies = settings_policies(tmp_path / "policies")
    decide_into_store(policies, data, SETTINGS_REQUESTS, flags=SETTINGS_FLAGS)
    admin = decide_into_store(POLICIES, data, ADMIN_REQUESTS)
    with running_audit(data, tmp_path / "audit.log") as audit:
        url = ["--audit-url", audit.url]
        replay: list[str | Path] = [
            *("policy", "replay", "--policies", policies, "--workload", "api"),
            *url,
        ]
        # Under this machine's defaults (no alias, Rego only for CUSTOM) every one of
        # these would flip; under the recorded settings none does.
        same = run_cli(*replay, "--fail-on-flip").ok().stdout
        assert "re-evaluated 5: 5 unchanged, 0 allow→deny, 0 deny→allow" in same, same
        assert "note:" not in same, same
        assert "stopped at the limit" not in same, same
        overridden = run_cli(*replay, "--trust-domain", "cluster.local", "--output", "json").json()
        assert overridden["flips"] == {"allow_to_deny": 3, "deny_to_allow": 0}
        (note,) = overridden["notes"]
        assert 'replayed with trust_domain "cluster.local" (given), not "example.org"' in note
        cut = run_cli(*replay, "--limit", "2").ok().stdout
        assert "replayed 2 recorded decisions" in cut, cut
        assert "stopped at the limit of 2: more recorded decisions match" in cut, cut

        no_token = admin[5]  # Rego's 401, decided on what the trail keeps
        text = run_cli("audit", "explain", no_token.decision_id, *url).ok().stdout
        assert "decision data.envoy.authz.allow (package envoy.authz)" in text, text
        assert "CUSTOM           default.admin-rego" in text, text
        assert "evaluated again: denied (denied_by_policy), the same as recorded" in text, text
        on_token = admin[3]  # Rego's 403 for bob, decided on his token
        text = run_cli("audit", "explain", on_token.decision_id, *url).ok().stdout
        assert '  recorded: {"allowed": false, "http_status": 403' in text, text
        assert "  value of the stored request: " in text, text
        assert "evaluated again of the stored request: denied" in text, text
        assert "not comparable (see the note)" in text, text
        assert "a Rego module reads header authorization, which is not stored" in text, text


def test_tail_shows_a_decision_stored_after_a_newer_one(tmp_path: Path) -> None:
    # Envoy's access log reaches the trail a second or more after the request, so a
    # decision can be stored after newer ones that tail has shown already.
    data = tmp_path / "data"
    now = time.time_ns() // 1000

    def store(n: int, time_us: int) -> str:
        writer = SpoolWriter(data / "audit" / "spool")
        record = make_record(n, time_us=time_us)
        writer.submit(record)
        writer.close()
        run_cli("audit", "ship", "--once", "--data-dir", data).ok()
        return record.decision_id

    first = store(1, now)
    with (
        running_audit(data, tmp_path / "audit.log") as audit,
        subprocess.Popen(
            [
                str(MESHWARD),
                "audit",
                "tail",
                "--since",
                "1m",
                "--count",
                "2",
                "--output",
                "json",
                "--interval",
                "0.1",
                "--audit-url",
                audit.url,
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=cli_env(),
        ) as tail,
    ):
        assert tail.stdout is not None
        try:
            assert json.loads(tail.stdout.readline())["decision_id"] == first
            late = store(2, now - 2_000_000)  # decided before the first, stored after it
            rest, _ = tail.communicate(timeout=CLI_DEADLINE)  # it stops after --count 2
        finally:
            tail.kill()
        assert [json.loads(line)["decision_id"] for line in rest.splitlines()] == [late]
