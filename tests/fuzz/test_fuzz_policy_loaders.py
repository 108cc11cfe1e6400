"""AuthorizationPolicy YAML and Rego modules from hostile hands: an error that names the
problem, or a policy set; never another exception (a regorus panic is a BaseException,
so it is caught here too)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from authz.errors import PolicyIssue, PolicyLoadError
from authz.istio_loader import parse_documents
from authz.rego_engine import RegoModule, compile_rego

SAMPLE_POLICY = Path(__file__).parents[2] / "policies" / "rego" / "envoy" / "authz" / "policy.rego"
FIELDS = [
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "spec",
    "selector",
    "matchLabels",
    "targetRef",
    "targetRefs",
    "action",
    "provider",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "namespaces",
    "ipBlocks",
    "remoteIpBlocks",
    "serviceAccounts",
    "hosts",
    "ports",
    "methods",
    "paths",
    "notPaths",
    "key",
    "values",
    "notValues",
]
WORDS = st.sampled_from(
    [
        "ALLOW",
        "DENY",
        "CUSTOM",
        "AUDIT",
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "default",
        "istio-system",
        "*",
        "/a/{*}",
        "/{**}",
        "request.headers[x]",
        "source.ip",
        "10.0.0.0/8",
        "example.org/ns/a/sa/b",
        "cluster.local/ns/*",
        "80",
        "GET",
        "",
    ]
)
SCALARS = st.one_of(WORDS, st.text(max_size=20), st.integers(), st.booleans(), st.none())
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=8)), inner, max_size=5),
    ),
    max_leaves=25,
)
VALID = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "p", "namespace": "default"},
    "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]},
}


def _issues(call: Callable[[], object]) -> tuple[PolicyIssue, ...] | None:
    """The issues ``call`` refuses with (PolicyLoadError), or None when it loads."""
    try:
        call()
    except PolicyLoadError as exc:
        return tuple(exc.issues)
    return None


def _load(text: str) -> None:
    issues = _issues(lambda: parse_documents(text, file="p.yaml", trust_domain="example.org"))
    assert issues is None or all(issue.message for issue in issues)
    assert issues != ()


@given(VALUES)
@example({**VALID, "spec": {"rules": [{"from": [{"source": {"principals": [None]}}]}]}})
@example({**VALID, "spec": {"action": "CUSTOM"}})
def test_policy_documents(document: Any) -> None:
    _load(yaml.safe_dump(document))


@given(st.dictionaries(st.sampled_from(list(VALID)), VALUES, max_size=4))
def test_policy_documents_with_mangled_top_level_fields(fields: dict[str, Any]) -> None:
    _load(yaml.safe_dump({**VALID, **fields}))


def _alias_bomb(levels: int) -> str:
    """A policy whose principals are nine lists of nine lists of … (9**levels strings)."""
    lines = ['  a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: p, namespace: default}\nanchors:\n"
        + "\n".join(lines)
        + f"\nspec:\n  rules:\n  - from: [{{source: {{principals: *a{levels - 1}}}}}]\n"
    )


@given(st.text(max_size=300))
@example(_alias_bomb(9))  # 387 million strings if expanded: refused without expanding
@example("a: &x [*x]")
@example("---\n---\n")
@example("a: !!python/object:os.system x")
def test_policy_text(text: str) -> None:
    _load(text)


EDITS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=4000),
        st.integers(min_value=0, max_value=12),
        st.one_of(st.text(max_size=8), st.sampled_from(["{", "}", "[", "(", "if", " := ", "\n"])),
    ),
    min_size=1,
    max_size=4,
)


def _compile(text: str) -> None:
    modules = [RegoModule("policy.rego", text)]
    try:
        issues = _issues(lambda: compile_rego(modules))
    except BaseException as exc:  # a Rust panic is a BaseException: fail, named
        raise AssertionError(f"loading raised {type(exc).__name__}: {exc}") from None
    assert issues != ()
    if issues is not None:
        assert all(issue.message for issue in issues)
        return
    engine = compile_rego(modules)
    # What loads must evaluate without raising, whatever it answers.
    result = engine.evaluate({"attributes": {"request": {"http": {"method": "GET"}}}})
    assert result.error in (None, "undefined", "eval_error")


@given(EDITS)
def test_rego_modules_edited_at_random(edits: list[tuple[int, int, str]]) -> None:
    text = SAMPLE_POLICY.read_text().replace("import data.envoy.authz.mfa\n", "")
    text = text.replace(
        "\tnot mfa.missing # staged (dry-run): undefined, so never true, in the enforced decision\n",
        "",
    )
    for offset, length, insert in edits:
        at = offset % (len(text) + 1)
        text = text[:at] + insert + text[at + length :]
    _compile(text)


@given(st.text(max_size=200))
@example("package envoy.authz\n\nallow := count()\n")
@example("package envoy.authz\n\nallow := [v * 2 | some v in [1]]\n")
def test_rego_module_text(text: str) -> None:
    _compile(text if text.startswith("package") else f"package envoy.authz\n\n{text}")
