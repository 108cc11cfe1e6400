"""The Rego unit-test runner: test discovery, pass/fail/error, skipped tests, refusals.

Every case writes a small Rego directory and runs it as `meshward policy test` does.
The refusals matter most: each guards a construct that makes rego-cpp kill the
process, so a test here that regressed would abort the whole pytest run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.rego_engine import RegoModule
from authz.rego_tests import RegoTestOutcome, RegoTestRun, find_rego_tests, run_rego_tests

POLICY = """\
package envoy.authz

import data.roles

default allow := false

allow if role == "admin"

role := roles[input.user]
"""
ROLES = '{"alice": "admin", "bob": "viewer"}'


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def run(tmp_path: Path, tests: str, **files: str) -> RegoTestRun:
    root = write(
        tmp_path,
        {"policy.rego": POLICY, "roles/data.json": ROLES, "policy_test.rego": tests, **files},
    )
    return run_rego_tests(root)


def outcomes(result: RegoTestRun) -> dict[str, tuple[RegoTestOutcome, str]]:
    assert not result.issues, result.issues
    return {r.test.rule: (r.outcome, r.detail) for r in result.results}


TESTS = """\
package envoy.authz_test

import data.envoy.authz

test_admin_allowed if authz.allow with input.user as "alice"

test_viewer_allowed if authz.allow with input.user as "bob"

test_roles_from_data if {
\tauthz.allow with input.user as "bob" with data.roles.bob as "admin"
}

test_nobody_has_a_role if authz.role with input.user as "mallory"

test_a_number := 7

test_is_false := false

todo_test_later if false

helper(x) := x

test_with_args(x) if x
"""


def test_pass_fail_undefined_and_skip(tmp_path: Path) -> None:
    found = outcomes(run(tmp_path, TESTS))
    assert found == {
        "test_admin_allowed": (RegoTestOutcome.PASSED, ""),
        # A body that is false leaves the test undefined; false, undefined and any
        # other value than true fail, as in opa test.
        "test_viewer_allowed": (RegoTestOutcome.FAILED, "undefined"),
        "test_roles_from_data": (RegoTestOutcome.PASSED, ""),
        "test_nobody_has_a_role": (RegoTestOutcome.FAILED, "undefined"),
        "test_a_number": (RegoTestOutcome.FAILED, "value is 7, not true"),
        "test_is_false": (RegoTestOutcome.FAILED, "value is false, not true"),
        "todo_test_later": (RegoTestOutcome.SKIPPED, "todo_ test, not run"),
    }
    # Functions are not tests, whatever their name.
    assert "test_with_args" not in found


def test_an_erroring_test_is_an_error_and_leaves_the_others_alone(tmp_path: Path) -> None:
    tests = """\
package envoy.authz_test

import data.envoy.authz

conflicting := 1 if authz.allow
conflicting := 2 if authz.allow

test_conflict if conflicting == 1 with input.user as "alice"

test_fine if authz.allow with input.user as "alice"

test_also_fine if {
\tnot authz.allow with input.user as "bob"
}
"""
    found = outcomes(run(tmp_path, tests))
    outcome, detail = found["test_conflict"]
    assert outcome is RegoTestOutcome.ERRORED
    assert "rule conflicts" in detail
    assert found["test_fine"] == (RegoTestOutcome.PASSED, "")
    assert found["test_also_fine"] == (RegoTestOutcome.PASSED, "")


def test_results_name_package_rule_file_and_line(tmp_path: Path) -> None:
    result = run(tmp_path, TESTS)
    first = result.results[0]
    assert first.test.name == "envoy.authz_test.test_admin_allowed"
    assert (first.test.file, first.test.line) == (str(tmp_path / "policy_test.rego"), 5)
    assert first.as_dict() == {
        "kind": "rego",
        "name": "envoy.authz_test.test_admin_allowed",
        "file": str(tmp_path / "policy_test.rego"),
        "line": 5,
        "result": "pass",
        "detail": "",
    }


def test_tests_in_several_packages_and_files(tmp_path: Path) -> None:
    other = """\
package other_test

test_in_a_one_segment_package if data.envoy.authz.allow with input.user as "alice"
"""
    found = outcomes(
        run(
            tmp_path,
            "package envoy.authz_test\n\ntest_a if true\n\ntest_a if 1 == 1\n",
            **{"sub/other_test.rego": other},
        )
    )
    # A rule defined twice is one test.
    assert found == {
        "test_a": (RegoTestOutcome.PASSED, ""),
        "test_in_a_one_segment_package": (RegoTestOutcome.PASSED, ""),
    }


def test_staged_packages_are_visible_to_tests(tmp_path: Path) -> None:
    staged = """\
# METADATA
# custom:
#   dry_run: true
package envoy.staged

strict(user) := user == "alice"

blocked if not strict(input.user)
"""
    tests = """\
package envoy.staged_test

import data.envoy.staged

test_blocks_bob if staged.blocked with input.user as "bob"

test_calls_a_staged_function if staged.strict("alice")
"""
    found = outcomes(run(tmp_path, tests, **{"staged/policy.rego": staged}))
    assert set(found.values()) == {(RegoTestOutcome.PASSED, "")}


def test_the_decision_path_is_the_servers(tmp_path: Path) -> None:
    write(tmp_path, {"p.rego": "package mesh.gate\n\ndecision := true\n"})
    write(
        tmp_path, {"p_test.rego": "package mesh.gate_test\n\ntest_d if data.mesh.gate.decision\n"}
    )
    # With the default decision path the set would not load at all.
    refused = run_rego_tests(tmp_path)
    [issue] = refused.issues
    assert issue.message.startswith("no rule defines the decision")
    served = run_rego_tests(tmp_path, decision_path="mesh/gate/decision")
    assert [(r.test.name, r.outcome) for r in served.results] == [
        ("mesh.gate_test.test_d", RegoTestOutcome.PASSED)
    ]


def test_no_directory_or_no_test_modules_means_no_tests(tmp_path: Path) -> None:
    assert run_rego_tests(tmp_path / "missing") == RegoTestRun()
    write(tmp_path, {"policy.rego": POLICY})
    assert run_rego_tests(tmp_path) == RegoTestRun()


def test_a_policy_set_the_server_refuses_fails_before_any_test(tmp_path: Path) -> None:
    result = run(
        tmp_path,
        "package envoy.authz_test\n\ntest_a if true\n",
        **{"policy.rego": POLICY + "\nbad if http.send({})\n"},
    )
    assert result.results == ()
    [issue] = result.issues
    assert (issue.file, issue.line) == (str(tmp_path / "policy.rego"), 11)
    assert "http.send" in issue.message


@pytest.mark.parametrize(
    ("tests", "line", "message"),
    [
        ("package t_test\n\ntest_a {\n\ttrue\n}\n", 3, "Rego v0 syntax is not supported"),
        ("package t_test\n\ntest_a if {\n\tprint(1)\n}\n", 4, "`print` is not allowed"),
        ("package t_test\n\ntest_a if {\n\t1 ==\n}\n", None, "does not parse"),
    ],
)
def test_a_broken_test_module_is_reported_once_with_its_place(
    tmp_path: Path, tests: str, line: int | None, message: str
) -> None:
    result = run(tmp_path, tests)
    assert result.results == ()
    [issue] = result.issues
    assert issue.file == str(tmp_path / "policy_test.rego")
    if line is not None:
        assert issue.line == line
    assert message in issue.message


def test_with_whole_input_replaced(tmp_path: Path) -> None:
    # rego-cpp 1.5 killed the process compiling this; regorus runs it as OPA does.
    tests = """\
package envoy.authz_test

import data.envoy.authz

test_whole_input if authz.allow with input as {"user": "alice"}

test_string if "with input as" == "with input as"
"""
    result = run(tmp_path, tests)
    assert result.issues == ()
    assert [(r.test.rule, r.outcome) for r in result.results] == [
        ("test_whole_input", RegoTestOutcome.PASSED),
        ("test_string", RegoTestOutcome.PASSED),
    ]


def test_functions_of_one_name_and_two_arities_in_two_packages(tmp_path: Path) -> None:
    one = "package a_test\n\nrequest(x) := x\n\ntest_a if request(1) == 1\n"
    two = "package b_test\n\nrequest(x, y) := x\n\ntest_b if request(1, 2) == 1\n"
    result = run(tmp_path, one, **{"b_test.rego": two})
    assert result.issues == ()
    assert sorted((r.test.rule, r.outcome) for r in result.results) == [
        ("test_a", RegoTestOutcome.PASSED),
        ("test_b", RegoTestOutcome.PASSED),
    ]


def test_find_rego_tests_reads_rule_heads() -> None:
    module = RegoModule(
        "x_test.rego",
        "package a.b_test\n\n"
        "test_one if true\n\n"
        "test_obj.nested := true\n\n"
        "default test_two := false\n\n"
        "test_two if true\n\n"
        "not_a_test if true\n",
    )
    assert [(t.name, t.line) for t in find_rego_tests(module)] == [
        ("a.b_test.test_one", 3),
        ("a.b_test.test_two", 7),
    ]


def test_tests_in_the_policys_own_packages(tmp_path: Path) -> None:
    # OPA style: tests beside the rules, in the same package, and a library the
    # decision calls. Neither package may be treated as test-only.
    write(
        tmp_path,
        {
            "lib.rego": "package lib\n\nup(x) := upper(x)\n",
            "lib_test.rego": 'package lib\n\ntest_up if up("a") == "A"\n',
            "p.rego": 'package envoy.authz\n\nimport data.lib\n\nallow if lib.up(input.x) == "A"\n',
            "p_test.rego": 'package envoy.authz\n\ntest_allow if allow with input.x as "a"\n',
        },
    )
    result = run_rego_tests(tmp_path)
    assert not result.issues
    assert [(r.test.name, r.outcome) for r in result.results] == [
        ("lib.test_up", RegoTestOutcome.PASSED),
        ("envoy.authz.test_allow", RegoTestOutcome.PASSED),
    ]
