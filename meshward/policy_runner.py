"""``meshward policy test`` and ``meshward policy eval``: a policy repository run offline.

Request tests and ``eval`` go through ``build_authz``, the store and servicer that
``meshward authz`` serves with, given a memory sink and a registry of their own: a
test passes only if the server would decide the same way with the same config.
Rego unit tests run beside them (``authz.rego_tests``) with the server's decision path
and dry-run packages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from audit.sink import MemorySink
from authz.check_request import build_view
from authz.decision_trace import (
    PolicyMatch,
    RegoTrace,
    istio_summary,
    istio_trace,
    rego_trace,
    shadow_lines,
)
from authz.errors import AuthzError, PolicyIssue, PolicyLoadError
from authz.policy_store import PolicyStore, ServedPolicies
from authz.rego_engine import RegoResult
from authz.rego_tests import RegoTestOutcome, RegoTestResult, run_rego_tests
from authz.request_test_file import RequestTest, load_request_test, load_request_tests
from authz.request_tests import (
    Mismatch,
    Observed,
    RequestTestOutcome,
    RequestTestResult,
    build_check_request,
    compare,
    decide,
    run_request_test,
)
from authz.server import AuthorizationServicer
from meshward.authz_runtime import build_authz
from meshward.config import Config, ConfigError

__all__ = [
    "EvalReport",
    "Harness",
    "PolicyTestReport",
    "evaluate_request",
    "harness",
    "issue_dict",
    "load_harness",
    "run_policy_tests",
]

AnyTestResult = RegoTestResult | RequestTestResult


@dataclass(slots=True)
class Harness:
    """A policy directory loaded the way ``meshward authz`` serves it, deciding into memory."""

    store: PolicyStore
    servicer: AuthorizationServicer
    sink: MemorySink

    @property
    def served(self) -> ServedPolicies:
        assert self.store.current is not None, "load the harness with load_harness"
        return self.store.current


def harness(config: Config, directory: Path) -> Harness:
    """``directory`` loaded (problems in ``store.issues``)."""
    sink = MemorySink()
    store, servicer = build_authz(
        config, policies=directory, sink=sink, registry=CollectorRegistry()
    )
    store.reload()
    return Harness(store, servicer, sink)


def load_harness(config: Config, directory: Path) -> Harness:
    """``directory`` loaded, or PolicyLoadError with every problem."""
    loaded = harness(config, directory)
    if loaded.store.current is None or loaded.store.issues:
        raise PolicyLoadError(loaded.store.issues)
    return loaded


def _check_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(
            f"{directory} is not a directory (a policy repository holds istio/, rego/ and tests/)"
        )


def issue_dict(issue: PolicyIssue) -> dict[str, Any]:
    return {
        "file": issue.file,
        "line": issue.line,
        "document": issue.document,
        "field": issue.field,
        "message": issue.message,
    }


# -- policy test ---------------------------------------------------------------------------


@dataclass(slots=True)
class PolicyTestReport:
    directory: Path
    results: list[AnyTestResult] = field(default_factory=list)
    issues: list[PolicyIssue] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(str(r.outcome) == outcome for r in self.results)

    @property
    def ok(self) -> bool:
        failed = self.count("fail") + self.count("error")
        return not self.issues and not failed and bool(self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "directory": str(self.directory),
            "tests": len(self.results),
            "passed": self.count("pass"),
            "failed": self.count("fail"),
            "errors": self.count("error"),
            "skipped": self.count("skip"),
            "issues": [issue_dict(i) for i in self.issues],
            "results": [r.as_dict() for r in self.results],
        }

    def text(self) -> str:
        lines = [f"error: {issue}" for issue in self.issues]
        for result in self.results:
            lines.extend(_result_lines(result))
        if self.issues:
            lines.append(
                f"{len(self.issues)} problem(s) in {self.directory}: fix them, then run the tests"
                if not self.results
                else f"{len(self.issues)} problem(s) in {self.directory}"
            )
        if not self.results and not self.issues:
            lines.append(f"no tests in {self.directory}: add rego/**/*_test.rego or tests/*.yaml")
        if self.results:
            summary = (
                f"{len(self.results)} tests: {self.count('pass')} passed, "
                f"{self.count('fail')} failed, {self.count('error')} errors"
            )
            if self.count("skip"):
                summary += f", {self.count('skip')} skipped"
            lines.append(summary)
        return "\n".join(lines)


def _result_lines(result: AnyTestResult) -> list[str]:
    test = result.test
    name = test.name
    where = f"{test.file}:{test.line}"
    label = str(result.outcome).upper()
    lines = [f"{label:<5} {name}  ({where})"]
    if isinstance(result, RegoTestResult):
        if result.outcome in (RegoTestOutcome.FAILED, RegoTestOutcome.ERRORED):
            lines.append(f"      {result.detail}")
        return lines
    if result.outcome is RequestTestOutcome.PASSED:
        return lines
    lines.extend(f"      {mismatch}" for mismatch in result.mismatches)
    if result.detail and not result.mismatches:
        lines.append(f"      {result.detail}")
    if result.observed is not None:
        lines.append(f"      got: {_decision_line(result.observed)}")
    return lines


def _decision_line(observed: Observed) -> str:
    verdict = "allowed" if observed.allowed else f"denied {observed.status}"
    parts = [verdict, f"reason {observed.reason}", f"engine {observed.engine}"]
    if observed.policy:
        parts.append(f"policy {observed.policy}")
    if observed.error:
        parts.append(f"error {observed.error}")
    return ", ".join(parts)


def run_policy_tests(config: Config, directory: Path) -> PolicyTestReport:
    """Every Rego unit test and request test of ``directory``; problems instead of raising."""
    _check_directory(directory)
    report = PolicyTestReport(directory)
    rego = config.authz.rego
    rego_run = run_rego_tests(
        directory / "rego",
        decision_path=rego.decision,
        dry_run_packages=tuple(rego.dry_run_packages),
    )
    report.results.extend(rego_run.results)
    issues = list(rego_run.issues)
    tests: list[RequestTest] = []
    try:
        tests = load_request_tests(directory / "tests")
    except PolicyLoadError as exc:
        issues.extend(exc.issues)
    loaded = harness(config, directory)
    issues.extend(loaded.store.issues)
    if loaded.store.current is not None and not loaded.store.issues:
        report.results.extend(run_request_test(t, loaded.servicer, loaded.sink) for t in tests)
    # The Rego runner and the store both load rego/: the same problem, reported once.
    report.issues = list(dict.fromkeys(issues))
    return report


# -- policy eval ---------------------------------------------------------------------------


@dataclass(slots=True)
class EvalReport:
    test: RequestTest
    observed: Observed
    policies: list[PolicyMatch]
    istio: dict[str, Any]
    rego: RegoTrace | None  # None: the server did not consult Rego for this request
    mismatches: list[Mismatch]
    workload: str
    has_rego: bool = False

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "name": self.test.name,
            "request": _request_dict(self.test),
            "decision": self.observed.as_dict(),
            "istio": {**self.istio, "policies": [p.as_dict() for p in self.policies]},
            "rego": (
                {**self.rego.as_dict(), "consulted": True}
                if self.rego
                else {"consulted": False, "loaded": self.has_rego}
            ),
        }
        if self.test.expect is not None:
            out["mismatches"] = [m.as_dict() for m in self.mismatches]
        return out

    def text(self) -> str:
        request = self.test.request
        observed = self.observed
        lines = [
            f"request   {request.method} {request.path} (host {request.authority})",
            f"from      {request.principal or 'no client certificate'}",
            f"to        {self.workload}",
            f"decision  {_decision_line(observed)}",
        ]
        if observed.allowed and observed.upstream_headers:
            lines.append(f"upstream  {_headers_text(observed.upstream_headers)}")
        if observed.removed_headers:
            lines.append(f"removed   {', '.join(observed.removed_headers)}")
        if observed.response_headers:
            lines.append(f"client    {_headers_text(observed.response_headers)}")
        if not observed.allowed and observed.body:
            lines.append(f"body      {observed.body}")
        lines += ["", "Istio"]
        if self.istio["reason"] is None:
            lines.append("  not evaluated: the request was refused before any engine ran")
            return "\n".join(lines)
        if not self.policies:
            lines.append("  no AuthorizationPolicy applies to the workload")
        for match in self.policies:
            kind = match.action + (" (dry-run)" if match.dry_run else "")
            if match.provider:
                kind += f" provider {match.provider}"
            found = match.matched_rule or "no rule matched"
            lines.append(f"  {kind:<22} {match.policy:<36} {found}")
            if match.note:
                lines.append(f"  {'':<22} {match.note}")
        istio = self.istio
        decided = istio["policy_id"] or "-"
        lines.append(
            f"  verdict: {'allowed' if istio['allowed'] else 'denied'} ({istio['reason']}), "
            f"decided by {decided}"
        )
        lines += shadow_lines(istio)
        lines += ["", "Rego"]
        lines.extend(self._rego_lines())
        if self.test.expect is not None:
            lines.append("")
            if self.mismatches:
                lines.append("expected (from the request file), not met:")
                lines.extend(f"  {m}" for m in self.mismatches)
            else:
                lines.append("expected (from the request file): met")
        return "\n".join(lines)

    def _rego_lines(self) -> list[str]:
        trace = self.rego
        if trace is None:
            return [
                "  not consulted for this request (no CUSTOM policy with provider rego matched)"
                if self.has_rego
                else "  no Rego modules in rego/"
            ]
        lines = [f"  decision {trace.decision} (package {trace.package})"]
        if trace.dry_run_packages:
            lines.append(f"  dry-run packages: {', '.join(trace.dry_run_packages)}")
        if trace.input_error is not None:
            lines.append(f"  input: {trace.input_error}")
        if trace.result is not None:
            lines.append(f"  value: {_rego_value(trace.result)}")
        if trace.shadow is not None:
            lines.append(f"  with the dry-run packages: {_rego_value(trace.shadow)}")
        return lines


def _headers_text(headers: Any) -> str:
    return ", ".join(f"{k}: {v}" for k, v in headers.items())


def _rego_value(result: RegoResult) -> str:
    if result.defined:
        return json.dumps(result.value, sort_keys=True)
    return f"{result.error} ({result.detail})" if result.detail else str(result.error)


def _request_dict(test: RequestTest) -> dict[str, Any]:
    request = test.request
    destination = request.destination
    return {
        "principal": request.principal,
        "method": request.method,
        "path": request.path,
        "host": request.authority,
        "destination": {
            "namespace": destination.namespace,
            "labels": dict(destination.labels),
            "service": destination.service,
        },
    }


def evaluate_request(config: Config, directory: Path, request_file: Path) -> EvalReport:
    """One request through the server's engines, with the trace of how it was decided.

    Raises PolicyLoadError for a bad request file or policies that do not load.
    """
    _check_directory(directory)
    test = load_request_test(request_file)
    loaded = load_harness(config, directory)
    served = loaded.served
    # One CheckRequest for the decision and the trace: its request.time is in the input.
    check = build_check_request(test.request)
    observed = decide(check, loaded.servicer, loaded.sink)
    destination = test.request.destination
    report = EvalReport(
        test=test,
        observed=observed,
        policies=[],
        istio=istio_summary(None),
        rego=None,
        mismatches=compare(test.expect, observed) if test.expect is not None else [],
        workload=_workload_text(destination.namespace, destination.labels, destination.service),
        has_rego=served.rego is not None,
    )
    try:
        view = build_view(check)
    except AuthzError:
        return report  # denied before any engine ran (request_parse_error …): nothing to trace
    report.policies, istio = istio_trace(served.istio, view)
    report.istio = istio_summary(istio)
    record = observed.record
    # Only what the server asked: with authz.rego.mode custom, a CUSTOM rego match.
    if served.rego is not None and record is not None and record.rego_decision is not None:
        report.rego = rego_trace(
            served.rego,
            check,
            view,
            parse_body=config.authz.rego.parse_body,
            max_body_bytes=config.authz.rego.max_body_bytes,
        )
    return report


def _workload_text(namespace: str | None, labels: Any, service: str | None) -> str:
    parts = [f"namespace {namespace or '(none)'}"]
    if labels:
        parts.append("labels " + ",".join(f"{k}={v}" for k, v in labels.items()))
    if service:
        parts.append(f"service {service}")
    return ", ".join(parts)
