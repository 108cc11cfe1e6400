"""Rego unit tests, run the way ``opa test`` runs them.

Every rule whose name starts with ``test_`` in a ``*_test.rego`` module under the Rego
directory is one test. The policy modules, the data documents and all test modules
are compiled together, so a test reaches the policy under test as ``data.<package>``
and replaces parts of its input and data with ``with input.attributes as …`` /
``with data.x as …``. A test passes when its value is ``true``; ``false``, any other
value and undefined fail; an evaluation error (a conflict between rule outputs, a
malformed argument to a built-in) is an error. Rules named ``todo_test_*`` are
reported as skipped, as in OPA.

The directory is loaded exactly as ``meshward authz`` serves it
(``load_rego_policies``): a policy set the server would refuse fails the run with its
problems, whatever the tests say. Test modules pass the same compile-time checks as
policies (Rego v1 only, no ``print``, only supported built-ins with the right number
of arguments).

Tests see every package, dry-run (staged) ones included, as OPA's tests do. Each test
package is compiled once, its package document evaluated with an empty input
document; when that document fails (one test errs), each of its tests is compiled and
evaluated on its own, so the error lands on the test that has it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from authz.errors import PolicyIssue, PolicyLoadError
from authz.policy_files import list_files
from authz.rego_data import UNREADABLE, read_data
from authz.rego_engine import (
    DATA_FILE_NAMES,
    DEFAULT_DECISION_PATH,
    TEST_MODULE_SUFFIX,
    RegoDataDocument,
    RegoModule,
    compile_rego,
    load_rego_policies,
)
from authz.rego_scan import scan

__all__ = [
    "TEST_MODULE_SUFFIX",
    "RegoTest",
    "RegoTestOutcome",
    "RegoTestResult",
    "RegoTestRun",
    "find_rego_tests",
    "run_rego_tests",
]


_TEST_RULE = re.compile(r"(?:todo_)?test_\w*")


class RegoTestOutcome(StrEnum):
    PASSED = "pass"
    FAILED = "fail"
    ERRORED = "error"
    SKIPPED = "skip"


@dataclass(slots=True, frozen=True)
class RegoTest:
    """One ``test_*`` rule: ``package.rule`` and where its first definition is."""

    package: str
    rule: str
    file: str
    line: int

    @property
    def name(self) -> str:
        return f"{self.package}.{self.rule}"

    @property
    def skipped(self) -> bool:
        return self.rule.startswith("todo_")


@dataclass(slots=True, frozen=True)
class RegoTestResult:
    test: RegoTest
    outcome: RegoTestOutcome
    detail: str = ""  # why it failed or errored; empty on pass
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "rego",
            "name": self.test.name,
            "file": self.test.file,
            "line": self.test.line,
            "result": str(self.outcome),
            "detail": self.detail,
        }


@dataclass(slots=True, frozen=True)
class RegoTestRun:
    """Every result, or the problems that kept the tests from running (then no results)."""

    results: tuple[RegoTestResult, ...] = ()
    issues: tuple[PolicyIssue, ...] = ()


def find_rego_tests(module: RegoModule) -> list[RegoTest]:
    """The test rules of one module that parses, in source order, each name once."""
    found = scan(module.text)
    package = ".".join(found.package)
    tests: dict[str, RegoTest] = {}
    for rule in found.rules:
        name = rule.path[0] if len(rule.path) == 1 else ""
        # OPA runs neither functions nor rules below the package (test_x.y) as tests.
        if rule.function or not _TEST_RULE.fullmatch(name):
            continue
        tests.setdefault(name, RegoTest(package, name, module.file, rule.line))
    return list(tests.values())


def run_rego_tests(
    directory: Path,
    *,
    decision_path: str = DEFAULT_DECISION_PATH,
    dry_run_packages: Sequence[str] = (),
) -> RegoTestRun:
    """Run every Rego unit test under ``directory`` (a policy repository's ``rego/``).

    ``decision_path`` and ``dry_run_packages`` are the server's (``authz.rego``), so
    the policy set is checked as it would be served. A missing directory, or one
    without test modules, has no tests. Never raises for what the files contain: their
    problems come back in ``issues``.
    """
    if not directory.is_dir():
        return RegoTestRun()
    policies, tests, documents, issues = _read(directory)
    if not tests and not issues:
        return RegoTestRun()
    modules = [*policies, *tests]
    if issues:
        return RegoTestRun(issues=tuple(issues))
    # Test-only packages count as dry-run: the engine then leaves them out of the
    # enforced bundle and compiles a test's bundle once, with every package in it,
    # instead of a second time without the staged ones. A package that policies define
    # too keeps its status: staging it would refuse the policies that call its functions.
    test_only = {_package(m) for m in tests} - {_package(m) for m in policies} - {""}
    staged = (*dry_run_packages, *sorted(test_only))
    try:
        # The policy set alone first: one the server would refuse fails the run even if
        # a test module happened to fill what it lacks.
        load_rego_policies(
            directory, decision_path=decision_path, dry_run_packages=dry_run_packages
        )
        # Then with the test modules, so a broken test module is reported once, with its
        # file and line, rather than as an error of each test.
        compile_rego(modules, documents, decision_path=decision_path, dry_run_packages=staged)
    except PolicyLoadError as exc:
        return RegoTestRun(issues=tuple(exc.issues))
    cases = [case for module in tests for case in find_rego_tests(module)]
    by_package: dict[str, list[RegoTest]] = {}
    for case in cases:
        by_package.setdefault(case.package, []).append(case)
    results: dict[RegoTest, RegoTestResult] = {}
    for package, members in by_package.items():
        batch = _run_package(package, members, modules, documents, staged)
        for case in members:
            found = batch.get(case) if batch is not None else None
            results[case] = found or _run(case, modules, documents, staged)
    return RegoTestRun(results=tuple(results[case] for case in cases))


def _package(module: RegoModule) -> str:
    return ".".join(scan(module.text).package)


def _read(
    directory: Path,
) -> tuple[list[RegoModule], list[RegoModule], list[RegoDataDocument], list[PolicyIssue]]:
    """Policy modules, test modules and data documents, as ``load_rego_policies`` finds them."""
    policies: list[RegoModule] = []
    tests: list[RegoModule] = []
    documents: list[RegoDataDocument] = []
    issues: list[PolicyIssue] = []
    for path in list_files(directory, lambda p: p.suffix == ".rego" or p.name in DATA_FILE_NAMES):
        relative = path.relative_to(directory)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            issues.append(PolicyIssue(str(path), 0, "", f"cannot be read: {exc}"))
            continue
        if path.name.endswith(TEST_MODULE_SUFFIX):
            tests.append(RegoModule(str(path), text))
        elif path.suffix == ".rego":
            policies.append(RegoModule(str(path), text))
        else:
            # A document that does not read is reported by load_rego_policies, which
            # runs before any test.
            value = read_data(str(path), text, [])
            if value is not UNREADABLE:
                documents.append(RegoDataDocument(str(path), relative.parent.parts, value))
    return policies, tests, documents, issues


def _entrypoint(case: RegoTest) -> str:
    return "/".join((*case.package.split("."), case.rule))


def _run_package(
    package: str,
    cases: Sequence[RegoTest],
    modules: Sequence[RegoModule],
    documents: Sequence[RegoDataDocument],
    staged: Sequence[str],
) -> dict[RegoTest, RegoTestResult] | None:
    """All tests of one package from one bundle whose entrypoint is the package document.

    A compile per package instead of per test. Rego evaluates the package document to
    the same values as each rule alone, but one erroring rule fails the whole
    document: None then (as for a one-segment package, which is no entrypoint), and the
    caller runs each test on its own to tell which one errs.
    """
    segments = package.split(".")
    if len(segments) < 2:
        return None
    started = time.perf_counter()
    try:
        engine = compile_rego(
            modules, documents, decision_path="/".join(segments), dry_run_packages=staged
        )
    except (PolicyLoadError, ValueError):
        return None
    result = engine.evaluate({})
    if result.error not in (None, "undefined"):
        return None
    values = result.value if isinstance(result.value, dict) else {}
    seconds = (time.perf_counter() - started) / len(cases)
    out: dict[RegoTest, RegoTestResult] = {}
    for case in cases:
        if case.skipped:
            out[case] = _skipped(case)
        elif case.rule not in values:
            out[case] = RegoTestResult(case, RegoTestOutcome.FAILED, "undefined", seconds)
        else:
            out[case] = _judged(case, values[case.rule], seconds)
    return out


def _skipped(case: RegoTest) -> RegoTestResult:
    return RegoTestResult(case, RegoTestOutcome.SKIPPED, "todo_ test, not run")


def _judged(case: RegoTest, value: Any, seconds: float) -> RegoTestResult:
    if value is True:
        return RegoTestResult(case, RegoTestOutcome.PASSED, "", seconds)
    shown = json.dumps(value, sort_keys=True)
    return RegoTestResult(case, RegoTestOutcome.FAILED, f"value is {shown}, not true", seconds)


def _run(
    case: RegoTest,
    modules: Sequence[RegoModule],
    documents: Sequence[RegoDataDocument],
    staged: Sequence[str],
) -> RegoTestResult:
    if case.skipped:
        return _skipped(case)
    started = time.perf_counter()
    try:
        engine = compile_rego(
            modules, documents, decision_path=_entrypoint(case), dry_run_packages=staged
        )
    except PolicyLoadError as exc:
        detail = "; ".join(str(issue) for issue in exc.issues)
        return RegoTestResult(case, RegoTestOutcome.ERRORED, detail)
    # OPA runs tests without input; an empty document reads the same for every
    # `input.x` a test does not replace.
    result = engine.evaluate({})
    seconds = time.perf_counter() - started
    if result.error == "undefined":
        return RegoTestResult(case, RegoTestOutcome.FAILED, "undefined", seconds)
    if not result.defined:
        return RegoTestResult(case, RegoTestOutcome.ERRORED, result.detail, seconds)
    return _judged(case, result.value, seconds)
