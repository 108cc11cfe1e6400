"""The Rego engine in `meshward authz`'s /ready and in `meshward policy lint`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from authz.policy_store import PolicyStore
from meshward.authz_runtime import AuthzStatus
from meshward.cli import cli

ALLOW = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewer, namespace: default}
spec:
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"""
CUSTOM = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec:
  action: CUSTOM
  provider: {name: rego}
  rules: [{}]
"""
MODULE = "package envoy.authz\n\nallow if input.ok\n"
STAGED = "package envoy.staged\n\nx := 1\n"


@pytest.fixture(autouse=True)
def no_meshward_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHWARD_"):
            monkeypatch.delenv(name)


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def status(root: Path, mode: str = "custom") -> tuple[bool, dict[str, object]]:
    store = PolicyStore(root, trust_domain="example.org", rego_dry_run_packages=("envoy.staged",))
    store.reload()
    ready = AuthzStatus(store, rego_mode=mode)
    ready.grpc_listening = "127.0.0.1:9191"
    return ready.ready()


# -- /ready ---------------------------------------------------------------------------


def test_ready_describes_the_rego_engine(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/p.rego": MODULE, "rego/s.rego": STAGED})
    ok, details = status(tmp_path)
    assert ok
    assert details["policy_set"] == {
        "version": details["policy_set"]["version"],  # type: ignore[index]
        "policies": 1,
        "rego": {
            "decision": "data.envoy.authz.allow",
            "modules": 2,
            "dry_run_packages": ["envoy.staged"],
        },
    }


@pytest.mark.parametrize(("mode", "ready"), [("custom", True), ("always", False)])
def test_mode_always_without_modules_is_not_ready(tmp_path: Path, mode: str, ready: bool) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW})
    ok, details = status(tmp_path, mode)
    assert ok is ready
    assert details["policy_set"]["rego"] is None  # type: ignore[index]
    if ready:
        assert "rego" not in details
    else:
        assert "every Check is denied (rego_not_loaded)" in str(details["rego"])


def test_ready_problems_carry_the_line(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "rego/p.rego": "package envoy.authz\n\nallow {\n"})
    ok, details = status(tmp_path)
    assert not ok
    [problem] = details["last_reload"]["problems"]  # type: ignore[index]
    assert problem["file"] == str(tmp_path / "rego/p.rego")
    assert (problem["document"], problem["field"], problem["line"]) == (0, "", 3)


# -- policy lint ----------------------------------------------------------------------


def lint(directory: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli, ["policy", "lint", str(directory), "--trust-domain", "example.org", *args]
    )
    return result.exit_code, result.output


def test_lint_prints_rego_problems_with_their_line(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "istio/a.yaml": ALLOW.replace('methods: ["GET"]', "methods: GET"),
            "rego/p.rego": "package envoy.authz\n\nallow {\n\tinput.ok\n}\n",
            "rego/data.json": "[1]",
        },
    )
    code, output = lint(tmp_path)
    assert code == 1
    lines = output.splitlines()
    assert lines[0].startswith(
        f"error: {tmp_path / 'istio/a.yaml'}[0] spec.rules[0].to[0].operation.methods: "
    )
    assert lines[1].startswith(f"error: {tmp_path / 'rego/data.json'}: must be an object")
    assert lines[2].startswith(
        f"error: {tmp_path / 'rego/p.rego'}:3: Rego v0 syntax is not supported"
    )

    code, output = lint(tmp_path, "--output", "json")
    report = json.loads(output)
    assert (code, report["ok"], report["errors"]) == (1, False, 3)
    assert [(i["document"], i["line"]) for i in report["issues"]] == [(0, None), (0, None), (0, 3)]


def test_lint_counts_modules_and_warns_about_rego_settings(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": CUSTOM, "rego/p.rego": MODULE})
    code, output = lint(tmp_path)
    assert (code, output) == (
        0,
        "1 AuthorizationPolicy documents and 1 Rego modules, no problems\n",
    )

    config = write(tmp_path / "conf", {"c.yaml": "authz:\n  rego:\n    dry_run_packages: [x.y]\n"})
    code, output = lint(tmp_path, "--config", str(config / "c.yaml"), "--strict")
    assert code == 1
    assert output == (
        f"warning: {tmp_path / 'rego'}: authz.rego.dry_run_packages lists x.y, which no module "
        "defines\n"
    )


def test_lint_warns_when_mode_always_has_no_modules(tmp_path: Path) -> None:
    write(tmp_path, {"istio/a.yaml": ALLOW, "conf.yaml": "authz:\n  rego:\n    mode: always\n"})
    code, output = lint(tmp_path, "--config", str(tmp_path / "conf.yaml"))
    assert code == 0
    assert output.startswith(f"warning: {tmp_path / 'rego'}: holds no Rego modules, and")


@pytest.mark.parametrize(("mode", "warned"), [("custom", True), ("always", False)])
def test_lint_warns_when_no_request_reaches_the_modules(
    tmp_path: Path, mode: str, warned: bool
) -> None:
    write(
        tmp_path,
        {
            "istio/a.yaml": ALLOW,
            "rego/p.rego": MODULE,
            "conf.yaml": f"authz:\n  rego:\n    mode: {mode}\n",
        },
    )
    code, output = lint(tmp_path, "--config", str(tmp_path / "conf.yaml"))
    assert code == 0
    expected = f"warning: {tmp_path / 'rego'}: no AuthorizationPolicy calls provider rego"
    assert output.startswith(expected) is warned
