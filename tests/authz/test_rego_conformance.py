"""The Rego engine against a corpus of cases whose expected value is OPA's answer.

``rego_conformance/*.yaml`` holds the cases and says where each expected value comes
from. A case the engine answers differently from OPA carries the engine's answer
(``engine``) and the reason (``difference``), so a difference is written down, listed
in the README, and any other change of answer fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.errors import PolicyLoadError
from authz.rego_engine import RegoDataDocument, RegoModule, RegoResult, compile_rego

CORPUS = Path(__file__).parent / "rego_conformance"
DIFFERENCES = {"strict", "bignum", "trace", "match_schema", "comprehension_term"}  # see README


def _cases() -> list[Any]:
    params = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for number, case in enumerate(yaml.safe_load(path.read_text())):
            name = case.get("name") or case["expr"]
            params.append(pytest.param(case, id=f"{path.stem}[{number}] {name}"))
    return params


def _evaluate(case: dict[str, Any]) -> RegoResult:
    body = f"x := {case['expr']}\n" if "expr" in case else case["module"]
    modules = [RegoModule("t.rego", f"package t\n\n{body}")]
    if "extra" in case:
        modules.append(RegoModule("extra.rego", case["extra"]))
    data = case.get("data")
    documents = []
    if data is not None:
        documents.append(RegoDataDocument("data.json", (), data))
    try:
        engine = compile_rego(modules, documents, decision_path=f"t/{case.get('query', 'x')}")
    except PolicyLoadError as exc:
        return RegoResult("data.t.x", error="load_error", detail=str(exc))
    return engine.evaluate(case.get("input", {}))


def _answer(result: RegoResult) -> Any:
    if result.error == "undefined":
        return "undefined"
    if result.error == "load_error":
        return "load_error"
    if result.error is not None:
        return "error"
    return result.value


def _normal(value: Any) -> Any:
    # Sets come back as lists in the engine's order; OPA's JSON of a set is sorted too.
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value


@pytest.mark.parametrize("case", _cases())
def test_case(case: dict[str, Any]) -> None:
    if case.get("undefined"):
        opa: Any = "undefined"
    elif case.get("error"):
        opa = "error"
    else:
        opa = case["want"]
    expected = case.get("engine", opa)
    if "engine" in case:
        assert case.get("difference") in DIFFERENCES, "a difference must say which one"
    result = _evaluate(case)
    assert _normal(_answer(result)) == expected, result.detail


def test_the_corpus_covers_every_supported_builtin() -> None:
    from authz.rego_builtins import ADDED_BUILTINS, supported_builtins

    text = "\n".join(p.read_text() for p in CORPUS.glob("*.yaml"))
    covered_elsewhere = set(ADDED_BUILTINS)  # io.jwt.* and crypto.*: test_rego_jwt.py
    missing = [
        name
        for name in supported_builtins()
        if name not in covered_elsewhere and f"{name}(" not in text
    ]
    assert missing == []
