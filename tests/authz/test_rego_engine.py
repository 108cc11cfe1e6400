"""The Rego engine on regorus: loading (and every refusal), evaluation, OPA-Envoy decisions."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import jwt
import pytest

from authz.errors import PolicyIssue, PolicyLoadError
from authz.rego_decision import HTTP_STATUSES, RegoDecision, interpret
from authz.rego_engine import (
    DEFAULT_DECISION_PATH,
    V0_MESSAGE,
    RegoEngine,
    RegoModule,
    RegoResult,
    compile_rego,
    load_rego_policies,
    parse_decision_path,
)
from authz.regorus_binding import Program

POLICIES = Path(__file__).parent / "rego_policies"
WEB = "spiffe://example.org/ns/default/sa/web"
ADMIN = "spiffe://example.org/ns/ops/sa/admin"
STRANGER = "spiffe://example.org/ns/default/sa/stranger"
ISSUER = "https://issuer.example.org"


def token(**claims: Any) -> str:
    payload = {"sub": "alice", "iss": ISSUER, "tenant": "acme", **claims}
    return jwt.encode(payload, "k" * 32, algorithm="HS256")


def envoy_input(
    method: str = "GET",
    path: str = "/api/items",
    principal: str = WEB,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The shape OPA-Envoy gives policies (the parts these policies read)."""
    return {
        "attributes": {
            "source": {"principal": principal},
            "request": {"http": {"method": method, "path": path, "headers": headers or {}}},
        }
    }


def bearer(**claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(**claims)}"}


@pytest.fixture(scope="module")
def engine() -> RegoEngine:
    return load_rego_policies(POLICIES)


def decide(source: str, input_document: dict[str, Any] | None = None) -> RegoDecision:
    """Compile one module into an engine and interpret its decision for the input."""
    module = RegoModule("policy.rego", "package envoy.authz\n\n" + source)
    return interpret(compile_rego([module]).evaluate(input_document or {}))


def write(root: Path, files: dict[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def load_issues(root: Path, **kwargs: Any) -> list[PolicyIssue]:
    with pytest.raises(PolicyLoadError) as info:
        load_rego_policies(root, **kwargs)
    return info.value.issues


GOOD = "package envoy.authz\n\nallow if input.ok\n"


# -- the OPA-Envoy style policy set under rego_policies/ ------------------------------


@pytest.mark.parametrize(
    ("request_input", "allowed", "status", "headers"),
    [
        pytest.param(
            envoy_input(headers=bearer()),
            True,
            None,
            (("x-roles", "reader"), ("x-user", "alice")),
            id="reader GET",
        ),
        pytest.param(
            envoy_input(method="POST", headers=bearer()),
            False,
            403,
            (("x-denied-by", "rego"),),
            id="reader POST",
        ),
        pytest.param(
            envoy_input(method="DELETE", principal=ADMIN, headers=bearer(sub="bob")),
            True,
            None,
            (("x-roles", "reader,writer"), ("x-user", "bob")),
            id="writer DELETE",
        ),
        pytest.param(
            envoy_input(path="/admin/users", principal=ADMIN, headers=bearer()),
            False,
            403,
            (("x-denied-by", "rego"),),
            id="path outside the grants",
        ),
        pytest.param(
            envoy_input(principal=STRANGER, headers=bearer()),
            False,
            403,
            (("x-denied-by", "rego"),),
            id="principal without roles",
        ),
        pytest.param(
            envoy_input(),
            False,
            401,
            (("www-authenticate", 'Bearer realm="mesh"'),),
            id="no token",
        ),
        pytest.param(
            envoy_input(headers=bearer(iss="https://evil.example.com")),
            False,
            401,
            (("www-authenticate", 'Bearer realm="mesh"'),),
            id="token of another issuer",
        ),
        pytest.param(
            envoy_input(headers={"authorization": "Bearer not-a-jwt"}),
            False,
            401,
            (("www-authenticate", 'Bearer realm="mesh"'),),
            id="malformed token",
        ),
    ],
)
def test_rbac_policy(
    engine: RegoEngine,
    request_input: dict[str, Any],
    allowed: bool,
    status: int | None,
    headers: tuple[tuple[str, str], ...],
) -> None:
    decision = interpret(engine.evaluate(request_input))
    assert (decision.allowed, decision.http_status, decision.headers) == (allowed, status, headers)
    assert decision.reason == ("allowed_by_policy" if allowed else "denied_by_policy")
    assert decision.decision == "data.envoy.authz.allow"


def test_allow_carries_request_and_response_edits(engine: RegoEngine) -> None:
    decision = interpret(engine.evaluate(envoy_input(headers=bearer(tenant="initech"))))
    assert decision.request_headers_to_remove == ("authorization",)
    assert decision.response_headers_to_add == (("x-policy", "rbac"),)
    assert decision.query_parameters_to_set == (("tenant", "initech"),)
    assert decision.query_parameters_to_remove == ("debug",)
    assert decision.dynamic_metadata == {"subject": "alice", "roles": ["reader"]}
    assert decision.body is None


def test_deny_carries_status_body_and_headers(engine: RegoEngine) -> None:
    decision = interpret(engine.evaluate(envoy_input()))
    assert decision.http_status == 401
    assert decision.body == "a bearer token from issuer.example.org is required"
    assert decision.request_headers_to_remove == ()


def test_policy_set_facts(engine: RegoEngine) -> None:
    assert engine.decision == "data.envoy.authz.allow"
    assert engine.package == "envoy.authz"
    assert engine.dry_run_packages == frozenset({"envoy.canary"})
    assert not engine.dry_run
    # policy_test.rego is Rego v0 and would be refused: it was not loaded.
    assert not any(f.endswith("_test.rego") for f in engine.files)
    assert len(engine.version) == 16
    assert load_rego_policies(POLICIES).version == engine.version


def test_dry_run_package_decision_is_reported_as_such() -> None:
    dry = load_rego_policies(POLICIES, decision_path="envoy/canary/allow")
    result = dry.evaluate(envoy_input(headers=bearer()))
    assert (result.value, result.dry_run) == (True, True)
    assert interpret(result).dry_run


def test_threads_share_one_bundle(engine: RegoEngine) -> None:
    cases = [
        (envoy_input(headers=bearer()), True),
        (envoy_input(method="POST", headers=bearer()), False),
        (envoy_input(method="POST", principal=ADMIN, headers=bearer()), True),
        (envoy_input(principal=STRANGER, headers=bearer()), False),
    ]
    wrong: list[tuple[int, Any]] = []

    def work(offset: int) -> None:
        for i in range(200):
            request_input, allowed = cases[(i + offset) % len(cases)]
            result = engine.evaluate(request_input)
            if result.value is None or result.value["allowed"] is not allowed:
                wrong.append((i, result))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# -- decisions: what OPA-Envoy accepts and what fails closed --------------------------


@pytest.mark.parametrize(
    ("source", "allowed", "reason", "status"),
    [
        ("allow := true", True, "allowed_by_policy", None),
        ("allow := false", False, "denied_by_policy", 403),
        ('allow := {"allowed": true}', True, "allowed_by_policy", None),
        ('allow := {"allowed": false}', False, "denied_by_policy", 403),
        ('allow := {"allowed": false, "http_status": 429}', False, "denied_by_policy", 429),
        ('allow := {"allowed": false, "http_status": 302}', False, "denied_by_policy", 302),
        # Only the keys of the branch taken are read, as OPA-Envoy does.
        ('allow := {"allowed": true, "http_status": "nope"}', True, "allowed_by_policy", None),
        (
            'allow := {"allowed": false, "query_parameters_to_remove": 1}',
            False,
            "denied_by_policy",
            403,
        ),
        ('allow := "yes"', False, "bad_decision", 403),
        ("allow := 1", False, "bad_decision", 403),
        ("allow := null", False, "bad_decision", 403),
        ("allow := [true]", False, "bad_decision", 403),
        ("allow := {true}", False, "bad_decision", 403),
        ('allow := {"allow": true}', False, "bad_decision", 403),
        ('allow := {"allowed": "true"}', False, "bad_decision", 403),
        ('allow := {"allowed": false, "http_status": 600}', False, "bad_decision", 403),
        ('allow := {"allowed": false, "http_status": 99}', False, "bad_decision", 403),
        ('allow := {"allowed": false, "http_status": 418}', False, "bad_decision", 403),
        # regorus keeps one number type: 403.0 is 403 (OPA-Envoy refuses 403.0).
        ('allow := {"allowed": false, "http_status": 403.0}', False, "denied_by_policy", 403),
        ('allow := {"allowed": false, "http_status": "403"}', False, "bad_decision", 403),
        ('allow := {"allowed": false, "body": 1}', False, "bad_decision", 403),
        ('allow := {"allowed": true, "headers": "x: y"}', False, "bad_decision", 403),
        ('allow := {"allowed": true, "headers": {"x": 1}}', False, "bad_decision", 403),
        ('allow := {"allowed": true, "headers": {"x": ["a", 1]}}', False, "bad_decision", 403),
        ('allow := {"allowed": true, "headers": [{"x": "a"}, "b"]}', False, "bad_decision", 403),
        (
            'allow := {"allowed": true, "request_headers_to_remove": "x"}',
            False,
            "bad_decision",
            403,
        ),
        (
            'allow := {"allowed": true, "query_parameters_to_set": ["a"]}',
            False,
            "bad_decision",
            403,
        ),
        ('allow := {"allowed": true, "dynamic_metadata": "x"}', False, "bad_decision", 403),
        ('allow := {"allowed": false, "dynamic_metadata": []}', False, "bad_decision", 403),
        ("allow if input.missing", False, "undefined", 403),
        ("allow := true\nallow := false", False, "eval_error", 403),
        # A failing built-in fails the evaluation (OPA: undefined, unless strict).
        ("allow := 1 / input.zero", False, "eval_error", 403),
        ("allow if allow", False, "eval_error", 403),
    ],
)
def test_decision_values(source: str, allowed: bool, reason: str, status: int | None) -> None:
    decision = decide(source, {"zero": 0})
    assert (decision.allowed, decision.reason, decision.http_status) == (allowed, reason, status)
    if reason in ("bad_decision", "eval_error", "undefined"):
        assert decision.detail


def test_bad_decision_detail_names_the_key() -> None:
    detail = decide('allow := {"allowed": true, "headers": {"x": ["a", 1]}}').detail
    assert detail == "`headers.x[1]` must be a string, not a number (1)"
    detail = decide('allow := {"allowed": false, "http_status": 600}').detail
    assert "`http_status` 600 is not an HTTP status Envoy accepts" in detail


def test_headers_as_list_of_objects_and_repeated_values() -> None:
    decision = decide(
        'allow := {"allowed": true, "headers": [{"a": "1"}, {"a": ["2", "3"], "b": "4"}],'
        ' "response_headers_to_add": {"set-cookie": ["x=1", "y=2"]}}'
    )
    assert decision.headers == (("a", "1"), ("a", "2"), ("a", "3"), ("b", "4"))
    assert decision.response_headers_to_add == (("set-cookie", "x=1"), ("set-cookie", "y=2"))


def test_undefined_and_errors_are_failures_not_values() -> None:
    engine = compile_rego([RegoModule("p.rego", "package envoy.authz\n\nallow if input.ok\n")])
    result = engine.evaluate({})
    assert (result.defined, result.error, result.value) == (False, "undefined", None)
    assert "data.envoy.authz.allow is undefined" in result.detail
    assert engine.evaluate({"ok": True}) == RegoResult("data.envoy.authz.allow", value=True)


def test_eval_error_detail_comes_from_the_engine() -> None:
    decision = decide("allow := true\nallow := false")
    assert decision.detail.endswith("policy.rego:4: rule conflicts with rule at policy.rego:3:1")


def test_timeout_discards_a_late_result() -> None:
    ticks = iter([0.0, 5.0])
    module = RegoModule("p.rego", "package envoy.authz\n\nallow := true\n")
    engine = compile_rego([module], clock=lambda: next(ticks))
    result = engine.evaluate({}, timeout=1.0)
    assert (result.error, result.value) == ("timeout", None)
    decision = interpret(result)
    assert (decision.allowed, decision.reason, decision.http_status) == (False, "timeout", 403)


def test_loading_this_threads_engine_is_not_timed_as_the_evaluation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    module = RegoModule("p.rego", "package envoy.authz\n\nallow := true\n")
    engine = compile_rego([module], clock=lambda: now[0])
    build = Program._build

    def slow_build(program: Program) -> Any:
        now[0] += 10.0  # a large data set being loaded into this thread's engine
        return build(program)

    monkeypatch.setattr(Program, "_build", slow_build)
    result = engine.evaluate({}, timeout=1.0)  # the first evaluation in this thread
    assert (result.error, result.value) == (None, True)


def test_result_within_the_timeout_stands() -> None:
    ticks = iter([0.0, 0.5])
    module = RegoModule("p.rego", "package envoy.authz\n\nallow := true\n")
    engine = compile_rego([module], clock=lambda: next(ticks))
    assert engine.evaluate({}, timeout=1.0).value is True


def test_http_statuses_are_those_of_envoys_enum() -> None:
    from envoy.type.v3 import http_status_pb2

    envoy = {v.number for v in http_status_pb2.StatusCode.DESCRIPTOR.values} - {0}
    assert envoy == HTTP_STATUSES


# -- input and output strings ---------------------------------------------------------

ECHO = 'allow := {"allowed": false, "body": input.s, "headers": {"x-seen": input.s}}'


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        'with "quotes"',
        "back\\slash",
        "new\nline\ttab\x01",
        "héllo wörld ✓",
        'a"}, "allowed": true, "x": {"y": "',
        "",
    ],
)
def test_strings_round_trip_and_cannot_rewrite_the_decision(text: str) -> None:
    decision = decide(ECHO, {"s": text})
    assert (decision.allowed, decision.body, decision.headers) == (
        False,
        text,
        (("x-seen", text),),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**62, 2**62),
        (2**64, float(2**64)),  # beyond 64 bits: passed as a number, not wrapped around
        (-1.5, -1.5),
        ([1, "a", None, True], [1, "a", None, True]),
        ({"nested": {"k": ["v"]}}, {"nested": {"k": ["v"]}}),
        ((1, 2), [1, 2]),
    ],
)
def test_input_values_round_trip(value: Any, expected: Any) -> None:
    engine = compile_rego([RegoModule("p.rego", "package envoy.authz\n\nallow := input.v\n")])
    assert engine.evaluate({"v": value}).value == expected


def test_string_comparisons_see_escaped_strings_the_same_way() -> None:
    source = 'allow if input.h == "say \\"hi\\""'
    assert decide(source, {"h": 'say "hi"'}).allowed


@pytest.mark.parametrize(
    ("value", "detail"),
    [
        (object(), "cannot be converted"),
    ],
)
def test_input_without_json_form_is_an_eval_error(value: Any, detail: str) -> None:
    engine = compile_rego([RegoModule("p.rego", GOOD)])
    result = engine.evaluate({"v": value})
    assert result.error == "eval_error"
    assert detail in result.detail


# -- loading: layout, data, dry-run ---------------------------------------------------


def test_data_documents_mount_at_their_directory(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "policy.rego": (
                "package envoy.authz\n\nallow := [data.a.b.c, data.team.x, data.top, data.n]\n"
            ),
            "data.json": '{"top": 1}',
            "a/b/data.yaml": "c: yaml\n",
            "team/data.yml": "x: [1, 2]\n",
            "n/data.json": "null",
            ".hidden/data.json": '{"ignored": true}',
            "notes.txt": "not loaded",
        },
    )
    engine = load_rego_policies(tmp_path)
    assert engine.evaluate({}).value == ["yaml", [1, 2], 1, None]


def test_objects_from_several_files_merge(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "policy.rego": "package envoy.authz\n\nallow := data.roles\n",
            "data.json": '{"roles": {"admin": ["alice"]}}',
            "roles/data.json": '{"reader": ["bob"]}',
        },
    )
    assert load_rego_policies(tmp_path).evaluate({}).value == {
        "admin": ["alice"],
        "reader": ["bob"],
    }


@pytest.mark.parametrize(
    ("spec", "dry_run_packages"),
    [
        ("# METADATA\n# custom:\n#   dry_run: true\npackage a\n", {"a"}),
        ("# METADATA\n# custom:\n#   dry_run: false\npackage a\n", set()),
        ("# METADATA\n# title: no flag\npackage a\n", set()),
        (
            "# METADATA\n# scope: subpackages\n# custom:\n#   dry_run: true\npackage a\n",
            {"a", "a.b"},
        ),
        ("# METADATA\n# custom: {dry_run: true}\npackage a\n", {"a"}),
    ],
)
def test_dry_run_annotations(tmp_path: Path, spec: str, dry_run_packages: set[str]) -> None:
    write(
        tmp_path,
        {
            "a.rego": spec + "\nx := 1\n",
            "b.rego": "package a.b\n\ny := 1\n",
            "policy.rego": GOOD,
        },
    )
    assert load_rego_policies(tmp_path).dry_run_packages == dry_run_packages


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("envoy/authz/allow", ("envoy", "authz", "allow")),
        ("/envoy/authz/allow/", ("envoy", "authz", "allow")),
        ("envoy.authz.allow", ("envoy", "authz", "allow")),
        ("data.envoy.authz.allow", ("envoy", "authz", "allow")),
    ],
)
def test_decision_path_forms(path: str, segments: tuple[str, ...]) -> None:
    assert parse_decision_path(path) == segments


@pytest.mark.parametrize("path", ["", "allow", "data.allow", "envoy/au-thz/allow", "envoy//"])
def test_bad_decision_paths(path: str) -> None:
    with pytest.raises(ValueError, match="must name a package and a rule"):
        parse_decision_path(path)


def test_decision_path_from_config(tmp_path: Path) -> None:
    write(tmp_path, {"p.rego": 'package mesh.gate\n\ndecision := {"allowed": true}\n'})
    engine = load_rego_policies(tmp_path, decision_path="mesh/gate/decision")
    assert interpret(engine.evaluate({})).allowed
    assert DEFAULT_DECISION_PATH == "envoy/authz/allow"


def test_issue_prints_file_and_line() -> None:
    issue = PolicyIssue("rego/a.rego", 0, "", "does not parse: Syntax error", 3)
    assert str(issue) == "rego/a.rego:3: does not parse: Syntax error"
    assert str(PolicyIssue("x.yaml", 1, "spec", "bad")) == "x.yaml[1]: spec: bad"


# -- loading: every refusal -----------------------------------------------------------

BAD_MODULES = [
    pytest.param(
        "package envoy.authz\n\nallow := [1, 2\n\nother := 3\n",
        5,
        "does not parse: expecting `]`",
        id="syntax error",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if input.x ==\n",
        4,
        "does not parse: ",
        id="dangling operator",
    ),
    pytest.param(
        "package envoy.authz\n\nallow {\n\tinput.ok\n}\n",
        3,
        V0_MESSAGE,
        id="v0 body without if",
    ),
    pytest.param(
        "package envoy.authz\n\nallow := true\n\ndeny[msg] {\n\tmsg := input.m\n}\n",
        5,
        V0_MESSAGE,
        id="v0 partial set",
    ),
    pytest.param(
        "package envoy.authz\n\nallow := x if {\n\tx := input.a\n} else = false {\n\tinput.b\n}\n",
        5,
        V0_MESSAGE,
        id="v0 else value without if",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if {\n\tinput.a\n} else {\n\tinput.b\n}\n",
        5,
        V0_MESSAGE,
        id="v0 else without if",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if {\n"
        '\tresp := http.send({"method": "GET", "url": "http://opa"})\n'
        "\tresp.status_code == 200\n}\n",
        4,
        "`http.send` is not allowed: regorus answers it undefined instead of sending",
        id="http.send",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if opa.runtime().env\n",
        3,
        "`opa.runtime` is not allowed",
        id="opa.runtime",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if {\n\tsome x in graphql.parse_schema(input.s)\n\tx\n}\n",
        4,
        "unknown function `graphql.parse_schema`: no module defines it and it is not a "
        "built-in meshward's Rego engine supports",
        id="graphql",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if io.jwt.verify_eddsa(input.t, input.k)\n",
        3,
        "unknown function `io.jwt.verify_eddsa`",
        id="unsupported io.jwt built-in",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if io.jwt.decode(input.t, input.k, 3)\n",
        3,
        "`io.jwt.decode` takes 1 argument (one more to bind its result), not 3",
        id="added built-in with too many arguments",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if lib.check(input)\n",
        3,
        "unknown function `lib.check`",
        id="unknown function",
    ),
    pytest.param(
        "package envoy.authz\n\nallow if {\n\tprint(input)\n\ttrue\n}\n",
        4,
        "`print` is not allowed",
        id="print",
    ),
    pytest.param(
        'package envoy.authz\n\nallow if re_match("^a", input.x)\n',
        3,
        "`re_match` is a Rego v0 built-in, removed in Rego v1; use regex.match",
        id="removed v0 built-in",
    ),
    pytest.param(
        # regorus would only notice when the rule is evaluated.
        "package envoy.authz\n\nallow if count() > 0\n",
        3,
        "`count` takes 1 argument (one more to bind its result), not 0",
        id="built-in without its arguments",
    ),
    pytest.param(
        'package envoy.authz\n\nallow if startswith(input.x, "a", "b", "c")\n',
        3,
        "`startswith` takes 2 arguments (one more to bind its result), not 4",
        id="built-in with too many arguments",
    ),
    pytest.param(
        "package envoy.authz\n\nallow := 1\n",
        None,
        None,
        id="control: a valid module",
    ),
]


@pytest.mark.parametrize(("source", "line", "message"), BAD_MODULES)
def test_bad_modules(tmp_path: Path, source: str, line: int | None, message: str | None) -> None:
    write(tmp_path, {"authz.rego": source})
    if message is None:
        load_rego_policies(tmp_path)
        return
    issues = load_issues(tmp_path)
    assert [(i.file, i.line) for i in issues] == [(str(tmp_path / "authz.rego"), line)]
    assert message in issues[0].message


V1_FORMS = [
    pytest.param("import rego.v1\n\nallow if input.ok\n", {"ok": True}, True, id="import rego.v1"),
    pytest.param(
        "import future.keywords.if\nimport future.keywords.in\n\nallow if 1 in input.xs\n",
        {"xs": [1]},
        True,
        id="future.keywords imports",
    ),
    pytest.param(
        'deny contains msg if {\n\tinput.x > 1\n\tmsg := sprintf("x is %d", [input.x])\n}\n\n'
        'allow := {"allowed": count(deny) == 0, "body": concat("; ", deny)}\n',
        {"x": 2},
        {"allowed": False, "body": "x is 2"},
        id="multi-value rule with contains",
    ),
    pytest.param(
        "default allow := false\n\nallow := true if {\n\tevery x in input.xs {\n\t\tx > 0\n\t}\n}\n",
        {"xs": [1, 2]},
        True,
        id="every",
    ),
    pytest.param(
        'allow := {\n\t"allowed": true,\n\t"headers": {"x": "y"},\n} if {\n\tinput.ok\n}'
        ' else := {"allowed": false} if {\n\tnot input.ok\n}\n',
        {"ok": False},
        {"allowed": False},
        id="object heads and else if",
    ),
    pytest.param(
        "roles[name] := level if {\n\tsome name, level in input.r\n}\n\n"
        "allow if roles.alice == 2\n",
        {"r": {"alice": 2}},
        True,
        id="ref head with a variable key",
    ),
    pytest.param(
        "double(x) := y if {\n\ty := x * 2\n}\n\ndefault check(_) := false\n\n"
        "check(x) if double(x) == 4\n\nallow if check(input.n)\n",
        {"n": 2},
        True,
        id="functions with default",
    ),
    pytest.param(
        "allow if {\n\tcount(input.xs, n)\n\tn == 2\n}\n",
        {"xs": [1, 2]},
        True,
        id="built-in with an output argument",
    ),
    pytest.param(
        "# a comment mentioning http.send(x) and count()\nallow if `{ not a body }` == input.s\n",
        {"s": "{ not a body }"},
        True,
        id="comments and raw strings are not code",
    ),
]


@pytest.mark.parametrize(("source", "input_document", "expected"), V1_FORMS)
def test_rego_v1_forms_load(source: str, input_document: dict[str, Any], expected: Any) -> None:
    engine = compile_rego([RegoModule("p.rego", "package envoy.authz\n\n" + source)])
    assert engine.evaluate(input_document).value == expected


def test_data_and_input_strings_compare_alike(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "p.rego": "package envoy.authz\n\nallow if data.users[input.user] == input.tag\n",
            "users/data.json": '{"o\\"neil": "tab\\there", "zoë": "ü"}',
        },
    )
    engine = load_rego_policies(tmp_path)
    assert engine.evaluate({"user": 'o"neil', "tag": "tab\there"}).value is True
    assert engine.evaluate({"user": "zoë", "tag": "ü"}).value is True
    assert engine.evaluate({"user": "zoë", "tag": "u"}).defined is False


def test_user_functions_are_not_builtins(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "lib/strings.rego": "package lib.text\n\nshout(s) := upper(s)\n",
            "authz.rego": (
                "package envoy.authz\n\nimport data.lib.text\nimport data.lib.text as t2\n\n"
                'allow if {\n\ttext.shout("a") == "A"\n\tt2.shout("b") == "B"\n'
                '\tdata.lib.text.shout("c") == "C"\n\tlocal("d")\n}\n\nlocal(x) if x == "d"\n'
            ),
        },
    )
    assert load_rego_policies(tmp_path).evaluate({}).value is True


def test_every_problem_is_listed_and_nothing_loads(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "a.rego": GOOD,
            "b.rego": "package b\n\np {\n\ttrue\n}\n",
            "c.rego": "package c\n\nx := [\n",
            "d.rego": "package d\n\np := 1\n\nq if net.cidr_merge([])\n",
        },
    )
    issues = load_issues(tmp_path)
    # The engine stops at a module's first syntax error; the calls of every module that
    # parses are all checked.
    assert [(Path(i.file).name, i.line) for i in issues] == [
        ("b.rego", 3),
        ("c.rego", 4),
        ("d.rego", 5),
    ]
    text = str(PolicyLoadError(issues))
    assert f"{tmp_path / 'b.rego'}:3: Rego v0 syntax is not supported" in text


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"data.json": '{"roles": {"admin": ["a"]}}', "roles/data.json": '{"admin": ["b"]}'},
            [("roles/data.json", "data.roles.admin", "is also defined by {root}/data.json")],
            id="same key in two files",
        ),
        pytest.param(
            {"data.json": '{"roles": "none"}', "roles/data.json": '{"admin": ["b"]}'},
            [("roles/data.json", "data.roles", "is also defined by {root}/data.json")],
            id="value where another file needs an object",
        ),
        pytest.param(
            {"a/data.json": '{"b": 1}', "a/b/data.yaml": "2\n"},
            [("a/data.json", "data.a.b", "is also defined by {root}/a/b/data.yaml")],
            id="nested document over a value",
        ),
        pytest.param(
            {"data.json": "[1, 2]"},
            [("data.json", "", "must be an object")],
            id="root document not an object",
        ),
        pytest.param(
            {"data.json": '{"a": 1,\n "b": }'},
            [("data.json", "", "is not valid JSON: Expecting value")],
            id="bad JSON",
        ),
        pytest.param(
            {"data.json": '{"a": NaN}'},
            [("data.json", "", "NaN is not a JSON number")],
            id="NaN",
        ),
        pytest.param(
            {"roles/data.yaml": "since: 2024-01-01\n"},
            [("roles/data.yaml", "since", "is not JSON data: a date")],
            id="YAML date",
        ),
        pytest.param(
            {"roles/data.yaml": "a: [\n"},
            [("roles/data.yaml", "", "is not valid YAML")],
            id="bad YAML",
        ),
    ],
)
def test_bad_data(
    tmp_path: Path, files: dict[str, str], expected: list[tuple[str, str, str]]
) -> None:
    write(tmp_path, {"policy.rego": GOOD, **files})
    issues = load_issues(tmp_path)
    assert [(str(Path(i.file).relative_to(tmp_path)), i.field) for i in issues] == [
        (file, field) for file, field, _ in expected
    ]
    for issue, (_, _, message) in zip(issues, expected, strict=True):
        assert message.format(root=tmp_path) in issue.message


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    write(tmp_path, {"policy.rego": GOOD, "data.json": '{"a": 1,\n "b": }'})
    assert [i.line for i in load_issues(tmp_path)] == [2]


def test_data_at_a_rule_path_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "authz.rego": "package envoy.authz\n\ndefault allow := false\n\nallow if input.ok\n",
            "envoy/authz/data.json": '{"allow": true, "other": 1}',
        },
    )
    issues = load_issues(tmp_path)
    data_file = tmp_path / "envoy/authz/data.json"
    assert [(Path(i.file).name, i.line) for i in issues] == [("authz.rego", 3), ("authz.rego", 5)]
    assert issues[0].message == (
        "rule data.envoy.authz.allow conflicts with data.envoy.authz.allow from "
        f"{data_file}: a path is either a rule or data, not both"
    )


def test_data_beside_rules_in_a_package_is_fine(tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "authz.rego": "package envoy.authz\n\nallow := data.envoy.authz.limit\n",
            "envoy/authz/data.json": '{"limit": 3}',
        },
    )
    assert load_rego_policies(tmp_path).evaluate({}).value == 3


def test_missing_decision_rule(tmp_path: Path) -> None:
    write(tmp_path, {"p.rego": "package envoy.other\n\nallow := true\n"})
    issues = load_issues(tmp_path)
    assert [(i.file, i.line) for i in issues] == [(str(tmp_path), None)]
    assert issues[0].message.startswith(
        "no rule defines the decision data.envoy.authz.allow: add a module with "
        "`package envoy.authz` and a rule `allow`"
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param({}, "holds no Rego modules", id="empty directory"),
        pytest.param({"a_test.rego": GOOD}, "holds no Rego modules", id="only tests"),
    ],
)
def test_nothing_to_load(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    write(tmp_path, files)
    assert [expected in i.message for i in load_issues(tmp_path)] == [True]


def test_not_a_directory(tmp_path: Path) -> None:
    issues = load_issues(tmp_path / "missing")
    assert issues[0].message == "is not a directory of Rego modules and data"


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            "# METADATA\n# custom:\n#   dry_run: yes please\npackage a\n",
            "custom.dry_run",
            "must be true or false",
        ),
        ("# METADATA\n# custom: [dry_run]\npackage a\n", "custom", "must be a mapping"),
        (
            "# METADATA\n# scope: rule\n# custom:\n#   dry_run: true\npackage a\n",
            "scope",
            "cannot annotate a package",
        ),
        ("# METADATA\n# custom: {\npackage a\n", "", "METADATA is not valid YAML"),
        (
            "package a\n\n# METADATA\n# custom:\n#   dry_run: true\nx := 1\n",
            "custom.dry_run",
            "is read only from the METADATA block right above `package`",
        ),
    ],
)
def test_bad_dry_run_annotations(tmp_path: Path, spec: str, field: str, message: str) -> None:
    write(tmp_path, {"a.rego": spec + "\ny := 1\n", "policy.rego": GOOD})
    issues = load_issues(tmp_path)
    assert [(i.field, message in i.message) for i in issues] == [(field, True)]
    assert issues[0].line is not None


def test_dry_run_flags_must_agree_across_files(tmp_path: Path) -> None:
    flag = "# METADATA\n# custom:\n#   dry_run: {}\npackage a\n\n{} := 1\n"
    write(
        tmp_path,
        {
            "a1.rego": flag.format("true", "x"),
            "a2.rego": flag.format("false", "y"),
            "policy.rego": GOOD,
        },
    )
    issues = load_issues(tmp_path)
    assert [(Path(i.file).name, i.line) for i in issues] == [("a2.rego", 1)]
    assert f"is dry_run: true in {tmp_path / 'a1.rego'}:1" in issues[0].message


def test_unreadable_module(tmp_path: Path) -> None:
    (tmp_path / "bad.rego").write_bytes(b'package envoy.authz\n\nallow := "\xff"\n')
    write(tmp_path, {"policy.rego": GOOD})
    issues = load_issues(tmp_path)
    assert [(Path(i.file).name, i.message.split(":")[0]) for i in issues] == [
        ("bad.rego", "cannot be read")
    ]
