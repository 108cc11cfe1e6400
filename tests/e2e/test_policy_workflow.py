"""End to end: the shipped policies/ passes `meshward policy test`, `policy eval` explains a
decision, and broken copies of policies/ fail with messages that say what to fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.e2e.processes import run_cli

POLICIES = Path(__file__).resolve().parents[2] / "policies"


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """A copy of the shipped policies/, to break."""
    copy = tmp_path / "policies"
    shutil.copytree(POLICIES, copy)
    return copy


def edit(path: Path, old: str, new: str) -> int:
    """Replace ``old`` (which must be there once) and return the line it was on."""
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} in {path}"
    path.write_text(text.replace(old, new))
    return text[: text.index(old)].count("\n") + 1


def test_the_shipped_sample_passes() -> None:
    text = run_cli("policy", "test", POLICIES).ok()
    lines = text.stdout.splitlines()
    assert all(line.startswith("PASS ") for line in lines[:-1]), text.describe()
    report = run_cli("policy", "test", POLICIES, "--output", "json").json()
    assert report["ok"] is True
    assert (report["failed"], report["errors"], report["skipped"]) == (0, 0, 0)
    assert report["passed"] == report["tests"] == len(lines) - 1
    kinds = {r["kind"] for r in report["results"]}
    assert kinds == {"rego", "request"}
    assert lines[-1] == f"{report['tests']} tests: {report['tests']} passed, 0 failed, 0 errors"
    # The sample is also what lint wants a policy repository to be.
    run_cli("policy", "lint", POLICIES, "--strict", "--trust-domain", "example.org").ok()


ADMIN_WRITE = """\
name: alice deletes a user without multi-factor login
request:
  principal: spiffe://example.org/ns/default/sa/frontend
  method: DELETE
  path: /admin/users/7
  bearer: {sub: alice, amr: [pwd]}
  destination: {namespace: default, labels: {app: admin}, service: admin}
expect:
  allowed: true
"""


def test_eval_explains_a_decision(tmp_path: Path) -> None:
    request = tmp_path / "request.yaml"
    request.write_text(ADMIN_WRITE)
    text = run_cli("policy", "eval", "--request", request, POLICIES).ok().stdout
    assert "decision  allowed, reason allowed_by_policy, engine istio, policy " in text
    assert "upstream  x-roles: admin, x-user: alice" in text
    # Istio: every policy on the workload in evaluation order, with the rule that matched.
    istio = text[text.index("\nIstio\n") : text.index("\nRego\n")].splitlines()[2:]
    assert [line.split()[0] for line in istio[:3]] == ["CUSTOM", "DENY", "ALLOW"]
    assert "default.admin-rego[rules[0]]" in istio[0]
    assert "no rule matched" in istio[1]
    assert "decided by default.admin-callers[rules[0]]" in text
    # Rego: the decision path, its value, and what the staged package would change.
    assert "decision data.envoy.authz.allow (package envoy.authz)" in text
    assert "dry-run packages: envoy.authz.mfa" in text
    assert '"x-user": "alice"' in text
    assert 'with the dry-run packages: {"allowed": false' in text
    assert text.rstrip().endswith("expected (from the request file): met")

    report = run_cli("policy", "eval", "--request", request, POLICIES, "--output", "json").json()
    assert report["decision"]["dry_run"]["meshward_rego_dry_run_shadow_result"] == "denied"
    assert report["istio"]["custom_policy_id"] == "default.admin-rego[rules[0]]"
    assert report["rego"]["result"]["value"]["allowed"] is True
    assert report["rego"]["shadow"]["value"]["http_status"] == 403
    assert report["mismatches"] == []


def test_eval_exits_one_when_the_expectation_is_not_met(tmp_path: Path) -> None:
    request = tmp_path / "request.yaml"
    request.write_text(ADMIN_WRITE.replace("allowed: true", "allowed: false"))
    result = run_cli("policy", "eval", "--request", request, POLICIES)
    assert result.returncode == 1, result.describe()
    assert "  allowed: expected false, got true" in result.stdout


def test_a_failing_expectation(policies: Path) -> None:
    tests = policies / "tests" / "ratings.yaml"
    line = edit(
        tests,
        "  expect:\n    allowed: true\n    policy: default.ratings-reader[rules[1]]",
        "  expect:\n    allowed: true\n    policy: default.ratings-reader[rules[0]]",
    )
    result = run_cli("policy", "test", policies)
    assert result.returncode == 1, result.describe()
    entry = line - 5  # the `- name:` line of that test
    failure = result.stdout[result.stdout.index("FAIL ") :].splitlines()
    assert failure[:3] == [
        f"FAIL  the admin console deletes a rating  ({tests}:{entry})",
        "      policy: expected default.ratings-reader[rules[0]], "
        "got default.ratings-reader[rules[1]]",
        "      got: allowed, reason allowed_by_policy, engine istio, "
        "policy default.ratings-reader[rules[1]]",
    ]
    assert result.stdout.splitlines()[-1].endswith(" passed, 1 failed, 0 errors")

    report = json.loads(run_cli("policy", "test", policies, "--output", "json").stdout)
    assert (report["ok"], report["failed"]) == (False, 1)
    [failed] = [r for r in report["results"] if r["result"] == "fail"]
    assert failed["mismatches"] == [
        {
            "field": "policy",
            "expected": "default.ratings-reader[rules[0]]",
            "got": "default.ratings-reader[rules[1]]",
        }
    ]


def test_a_rego_change_fails_unit_and_request_tests(policies: Path) -> None:
    # Support loses read access to users: the unit test and the request test both catch it.
    edit(policies / "rego" / "roles" / "data.json", '"path": "/admin/users"}', '"path": "/nope"}')
    result = run_cli("policy", "test", policies)
    assert result.returncode == 1, result.describe()
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL ")]
    assert [line.split("  (")[0] for line in failed] == [
        "FAIL  envoy.authz_test.test_support_may_read_users",
        "FAIL  support may read users",
    ]


def test_a_policy_that_does_not_load(policies: Path) -> None:
    module = policies / "rego" / "envoy" / "authz" / "policy.rego"
    line = edit(module, "permitted if {\n", "permitted if {\n\tprint(user)\n") + 1
    result = run_cli("policy", "test", policies)
    assert result.returncode == 1, result.describe()
    assert result.stdout.startswith(f"error: {module}:{line}: `print` is not allowed")
    assert f"1 problem(s) in {policies}: fix them, then run the tests" in result.stdout
    assert "Traceback" not in result.stderr


def test_a_malformed_test_file(policies: Path) -> None:
    tests = policies / "tests" / "reviews.yaml"
    line = edit(
        tests, "    reason: denied_by_policy\n", "    reason: denied_by_policy\n    code: 403\n"
    )
    result = run_cli("policy", "test", policies)
    assert result.returncode == 1, result.describe()
    assert result.stdout.splitlines()[0] == (
        f"error: {tests}:{line + 1}: tests[5].expect.code: unknown field; expected one of: "
        "allowed, status, reason, engine, policy, body, upstream_headers, removed_headers, "
        "response_headers, dry_run"
    )


def test_one_function_name_with_two_arities_in_two_packages(policies: Path) -> None:
    # rego-cpp 1.5 aborted the process compiling this (it was refused); regorus runs it.
    extra = policies / "rego" / "lib" / "strings.rego"
    extra.parent.mkdir()
    extra.write_text("package lib.strings\n\nrequest(x) := x\n")
    result = run_cli("policy", "test", policies)
    assert result.returncode == 0, result.describe()


def test_the_readme_example_is_a_passing_test(policies: Path) -> None:
    readme = (POLICIES / "README.md").read_text()
    example = readme[readme.index("```yaml\n") + len("```yaml\n") :]
    (policies / "tests" / "readme.yaml").write_text(example[: example.index("```")])
    report = run_cli("policy", "test", policies, "--output", "json").json()
    names = [r["name"] for r in report["results"] if r["file"].endswith("readme.yaml")]
    assert names == ["support may not delete users - 403 with a JSON body"]
    assert report["ok"] is True
