"""End to end: `meshward policy lint` prints errors and warnings; only errors (or --strict) fail."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.processes import run_cli

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: [example.org/ns/default/sa/productpage]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lock, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
"""
WARNING = (
    "warning: {file}[1] spec.rules: ALLOW policy default/lock has no rules, so it matches "
    "no request"
)


def policy_dir(tmp_path: Path, text: str) -> tuple[Path, Path]:
    path = tmp_path / "policies" / "istio" / "mesh.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return tmp_path / "policies", path


def test_warnings_exit_zero_unless_strict(tmp_path: Path) -> None:
    directory, file = policy_dir(tmp_path, POLICIES)
    args = ("policy", "lint", directory, "--trust-domain", "example.org")

    lenient = run_cli(*args).ok()
    assert lenient.stdout.splitlines()[0].startswith(WARNING.format(file=file))
    assert len(lenient.stdout.splitlines()) == 1

    strict = run_cli(*args, "--strict")
    assert strict.returncode == 1, strict.describe()
    assert strict.stdout == lenient.stdout

    report = run_cli(*args, "--output", "json").json()
    assert report["ok"] is True
    assert (report["errors"], report["warnings"], report["policies"]) == (0, 1, 2)
    [issue] = report["issues"]
    assert issue["severity"] == "warning"
    assert (issue["file"], issue["document"], issue["field"]) == (str(file), 1, "spec.rules")


def test_errors_exit_one_and_come_with_severity(tmp_path: Path) -> None:
    directory, file = policy_dir(tmp_path, POLICIES.replace("methods: [GET]", "methods: GET"))
    result = run_cli("policy", "lint", directory, "--output", "json")
    assert result.returncode == 1, result.describe()
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [(i["severity"], i["document"], i["field"]) for i in report["issues"]] == [
        ("error", 0, "spec.rules[0].to[0].operation.methods")
    ]

    text = run_cli("policy", "lint", directory)
    assert text.returncode == 1, text.describe()
    assert text.stdout.startswith(f"error: {file}[0] spec.rules[0].to[0].operation.methods: ")
