"""Dry-run packages in the Rego engine: the enforced bundle, the shadow, and load checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz.errors import PolicyIssue, PolicyLoadError
from authz.rego_engine import RegoModule, compile_rego, load_rego_policies

DECISION = """\
package envoy.authz

import data.envoy.staged

default allow := true

allow := false if staged.deny
"""
STAGED = """\
package envoy.staged

deny if input.method == "DELETE"
"""
ANNOTATION = "# METADATA\n# custom:\n#   dry_run: true\n"


def modules(*sources: tuple[str, str]) -> list[RegoModule]:
    return [RegoModule(file, text) for file, text in sources]


def load_issues(mods: list[RegoModule], **kwargs: object) -> list[PolicyIssue]:
    with pytest.raises(PolicyLoadError) as info:
        compile_rego(mods, **kwargs)  # type: ignore[arg-type]
    return info.value.issues


@pytest.mark.parametrize(
    ("staged", "configured"),
    [(ANNOTATION + STAGED, ()), (STAGED, ("envoy.staged",)), (STAGED, ("data.envoy.staged",))],
    ids=["annotated", "configured", "configured with data."],
)
def test_enforced_result_leaves_dry_run_packages_out(
    staged: str, configured: tuple[str, ...]
) -> None:
    engine = compile_rego(
        modules(("authz.rego", DECISION), ("staged.rego", staged)), dry_run_packages=configured
    )
    assert engine.dry_run_packages == frozenset({"envoy.staged"})
    assert not engine.dry_run
    evaluation = engine.evaluate_enforced({"method": "DELETE"})
    assert evaluation.result.value is True
    assert evaluation.shadow is not None
    assert evaluation.shadow.value is False
    # evaluate() is the whole set, as `meshward policy test` and eval see it.
    assert engine.evaluate({"method": "DELETE"}).value is False
    same = engine.evaluate_enforced({"method": "GET"})
    assert same.result.value is True
    assert same.shadow is not None
    assert same.shadow.value is True


def test_without_dry_run_packages_there_is_no_shadow() -> None:
    engine = compile_rego(modules(("authz.rego", DECISION), ("staged.rego", STAGED)))
    evaluation = engine.evaluate_enforced({"method": "DELETE"})
    assert (evaluation.result.value, evaluation.shadow) == (False, None)
    assert engine.dry_run_packages == frozenset()


def test_the_decisions_own_package_in_dry_run_is_evaluated_whole() -> None:
    engine = compile_rego(
        modules(("authz.rego", ANNOTATION + DECISION), ("staged.rego", STAGED)),
    )
    assert engine.dry_run
    evaluation = engine.evaluate_enforced({"method": "DELETE"})
    assert evaluation.shadow is None
    assert (evaluation.result.value, evaluation.result.dry_run) == (False, True)


def test_unknown_configured_packages_are_kept_for_lint_not_refused() -> None:
    plain = compile_rego(modules(("authz.rego", DECISION), ("staged.rego", STAGED)))
    engine = compile_rego(
        modules(("authz.rego", DECISION), ("staged.rego", STAGED)),
        dry_run_packages=("envoy.nothing", "envoy.staged"),
    )
    assert engine.unknown_dry_run_packages == frozenset({"envoy.nothing"})
    assert engine.dry_run_packages == frozenset({"envoy.staged"})
    assert engine.version != plain.version  # what is enforced differs
    assert engine.packages == frozenset({"envoy.authz", "envoy.staged"})


@pytest.mark.parametrize("name", ["", "data", "envoy.can-ary", "1x", "a b"])
def test_configured_package_names_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match="is not a Rego package name"):
        compile_rego(modules(("a.rego", DECISION)), dry_run_packages=(name,))


CALLS_STAGED = [
    pytest.param(
        "package envoy.authz\n\nimport data.envoy.staged\n\nallow if staged.check(input)\n",
        5,
        "staged.check",
        id="through an import",
    ),
    pytest.param(
        "package envoy.authz\n\nimport data.envoy.staged as s\n\nallow if s.check(input)\n",
        5,
        "s.check",
        id="through an alias",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if data.envoy.staged.check(input)\n",
        3,
        "data.envoy.staged.check",
        id="by its full path",
    ),
    pytest.param(
        "package envoy.authz\n\nimport data.envoy\n\nallow if envoy.staged.check(input)\n",
        5,
        "envoy.staged.check",
        id="through a parent import",
    ),
]


@pytest.mark.parametrize(("source", "line", "name"), CALLS_STAGED)
def test_enforced_modules_may_not_call_dry_run_functions(source: str, line: int, name: str) -> None:
    staged = ANNOTATION + "package envoy.staged\n\ncheck(x) if x.ok\n"
    issues = load_issues(modules(("authz.rego", source), ("staged.rego", staged)))
    assert [(i.file, i.line) for i in issues] == [("authz.rego", line)]
    assert issues[0].message.startswith(
        f"calls `{name}`, a function of dry-run package envoy.staged"
    )


def test_dry_run_packages_may_call_their_own_and_enforced_functions() -> None:
    lib = "package lib\n\nok(x) if x.ok\n"
    staged = ANNOTATION + (
        "package envoy.staged\n\nimport data.lib\n\nhelper(x) if lib.ok(x)\n\n"
        "deny if not helper(input)\n"
    )
    authz = "package envoy.authz\n\nimport data.envoy.staged\n\nallow if not staged.deny\n"
    engine = compile_rego(modules(("a.rego", authz), ("s.rego", staged), ("l.rego", lib)))
    evaluation = engine.evaluate_enforced({"ok": False})
    assert evaluation.result.value is True
    assert evaluation.shadow is not None
    assert evaluation.shadow.error == "undefined"


def test_subpackages_scope_stages_the_packages_below(tmp_path: Path) -> None:
    files = {
        "authz.rego": "package envoy.authz\n\nallow if data.envoy.staged.sub.check(input)\n",
        "staged.rego": "# METADATA\n# scope: subpackages\n# custom:\n#   dry_run: true\n"
        "package envoy.staged\n\nx := 1\n",
        "sub.rego": "package envoy.staged.sub\n\ncheck(x) if x.ok\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(PolicyLoadError) as info:
        load_rego_policies(tmp_path)
    assert [(Path(i.file).name, i.line) for i in info.value.issues] == [("authz.rego", 3)]
    assert "dry-run package envoy.staged.sub" in info.value.issues[0].message
