"""Request tests: the file format, the CheckRequest they send, and running them.

Runs go through the server's own PolicyStore and AuthorizationServicer on a policy
directory written per test, as `meshward policy test` does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from prometheus_client import CollectorRegistry

from audit.sink import MemorySink
from authz.check_request import build_view
from authz.errors import PolicyLoadError
from authz.policy_store import PolicyStore
from authz.rego_input import build_input
from authz.request_test_file import (
    Destination,
    Expectation,
    RequestTest,
    RequestUnderTest,
    load_request_test,
    load_request_tests,
)
from authz.request_tests import (
    Observed,
    RequestTestOutcome,
    build_check_request,
    compare,
    run_request_test,
)
from authz.server import AuthorizationServicer

FRONTEND = "spiffe://example.org/ns/default/sa/frontend"

ISTIO = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: viewer, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {principals: [example.org/ns/default/sa/frontend]}}]
    to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: want-trace
  namespace: default
  annotations: {istio.io/dry-run: "true"}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules: [{when: [{key: "request.headers[traceparent]", notValues: ["*"]}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: console, namespace: default}
spec:
  selector: {matchLabels: {app: admin}}
  action: CUSTOM
  provider: {name: rego}
  rules: [{}]
"""
REGO = """\
package envoy.authz

default allow := {"allowed": false, "http_status": 401, "body": "log in",
\t"headers": {"www-authenticate": "Bearer"}}

allow := {"allowed": true, "headers": {"x-user": claims.sub},
\t"request_headers_to_remove": ["authorization"]} if claims.sub == "alice"

claims := payload if {
\t[_, payload, _] := io.jwt.decode(trim_prefix(input.attributes.request.http.headers.authorization, "Bearer "))
}
"""

TESTS = """\
defaults:
  request:
    principal: spiffe://example.org/ns/default/sa/frontend
    destination: {namespace: default, labels: {app: reviews}, service: reviews}
tests:
- name: reads
  request:
    path: /reviews/1
    headers: {traceparent: "00-1-2-01"}
  expect:
    allowed: true
    reason: allowed_by_policy
    engine: istio
    policy: default.viewer[rules[0]]
    dry_run: {deny: allowed, deny_policy: null}
- name: writes
  request: {method: POST, path: /reviews/1}
  expect:
    allowed: false
    status: 403
    reason: no_allow_policy_matched
    policy: null
    body: "RBAC: access denied"
    dry_run: {deny: denied, deny_policy: "default.want-trace[rules[0]]"}
"""


def write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def servicer(root: Path) -> tuple[AuthorizationServicer, MemorySink]:
    write(root, {"istio/mesh.yaml": ISTIO, "rego/policy.rego": REGO})
    store = PolicyStore(root, trust_domain="example.org")
    assert store.reload(), store.issues
    sink = MemorySink()
    return AuthorizationServicer(store=store, sink=sink, registry=CollectorRegistry()), sink


def one(tmp_path: Path, entry: str) -> RequestTest:
    [test] = load_request_tests(write(tmp_path / "tests", {"t.yaml": f"tests:\n{entry}"}))
    return test


# -- the file format -----------------------------------------------------------------------


def test_a_file_with_defaults(tmp_path: Path) -> None:
    reads, writes = load_request_tests(write(tmp_path, {"reviews.yaml": TESTS}))
    assert (reads.name, reads.file, reads.line) == ("reads", str(tmp_path / "reviews.yaml"), 6)
    assert reads.request == RequestUnderTest(
        path="/reviews/1",
        principal=FRONTEND,
        headers={"traceparent": "00-1-2-01"},
        destination=Destination("default", {"app": "reviews"}, "reviews"),
    )
    assert writes.request.method == "POST"
    assert writes.request.destination.service == "reviews"
    assert writes.expect == Expectation(
        allowed=False,
        status=403,
        reason="no_allow_policy_matched",
        expects_policy=True,
        body="RBAC: access denied",
        dry_run={
            "istio_dry_run_deny_shadow_engine_result": "denied",
            "istio_dry_run_deny_shadow_effective_policy_id": "default.want-trace[rules[0]]",
        },
        expects_dry_run=True,
    )


def test_only_yaml_files_at_the_top_are_read(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": TESTS, "b.yml": TESTS, "notes.md": "x", ".hidden.yaml": ":"})
    write(tmp_path, {"sub/c.yaml": "not: [a test file"})
    assert [Path(t.file).name for t in load_request_tests(tmp_path)] == ["a.yaml"] * 2 + [
        "b.yml"
    ] * 2
    assert load_request_tests(tmp_path / "missing") == []


MALFORMED = [
    ("tests: []\n", 1, "tests", "must be a non-empty list of tests"),
    ("- name: x\n", 1, "", "must be a mapping, not a list"),
    ("tests:\n- {name: x, request: {path: /}}\n", 2, "tests[0].expect", "is required"),
    (
        "tests:\n- name: x\n  request: {path: /}\n  expect: {allowed: 'true'}\n",
        4,
        "tests[0].expect.allowed",
        "is required: true or false, not a string",
    ),
    (
        "tests:\n- name: x\n  request: {path: /}\n  expect: {allowed: true, status: 403}\n",
        4,
        "tests[0].expect.status",
        "applies to denied requests",
    ),
    (
        "tests:\n- name: x\n  request:\n    path: /\n    principal: example.org/ns/a/sa/b\n"
        "  expect: {allowed: true}\n",
        5,
        "tests[0].request.principal",
        "is not a SPIFFE ID",
    ),
    (
        "tests:\n- name: x\n  request: {path: /, verb: GET}\n  expect: {allowed: true}\n",
        3,
        "tests[0].request.verb",
        "unknown field; expected one of: principal,",
    ),
    (
        "tests:\n- name: x\n  request: {path: /, headers: {x-count: 5}}\n"
        "  expect: {allowed: true}\n",
        3,
        "tests[0].request.headers.x-count",
        "must be a string, not a number (5) (quote it)",
    ),
    (
        "tests:\n- name: x\n  request:\n    path: /\n    destination: {labels: {app: 'a,b'}}\n"
        "  expect: {allowed: true}\n",
        5,
        "tests[0].request.destination.labels.app",
        "no ',' or '=' in a label",
    ),
    (
        "tests:\n- name: x\n  request:\n    path: /\n    bearer: {sub: a}\n"
        "    headers: {Authorization: x}\n  expect: {allowed: true}\n",
        5,
        "tests[0].request.bearer",
        "cannot be used with headers.authorization",
    ),
    (
        "tests:\n- name: x\n  request: {path: /}\n  expect: {allowed: true}\n"
        "- name: x\n  request: {path: /}\n  expect: {allowed: true}\n",
        5,
        "tests[1].name",
        "'x' is also the name of tests[0]",
    ),
    (
        "tests:\n- name: x\n  request: {path: /}\n  expect: {allowed: true, dry_run: {deny: maybe}}\n",
        4,
        "tests[0].expect.dry_run.deny",
        "must be allowed or denied",
    ),
    (
        "defaults:\n  request: {method: get}\ntests:\n- name: x\n  request: {path: /}\n"
        "  expect: {allowed: true}\n",
        2,
        "defaults.request.method",
        "must be upper case",
    ),
    ("tests: [\n", 2, "", "is not valid YAML"),
    ("tests: []\n---\ntests: []\n", 1, "", "must hold one YAML document, not 2"),
]


@pytest.mark.parametrize(("text", "line", "field", "message"), MALFORMED)
def test_a_malformed_file_names_file_line_and_field(
    tmp_path: Path, text: str, line: int, field: str, message: str
) -> None:
    write(tmp_path, {"bad.yaml": text})
    with pytest.raises(PolicyLoadError) as info:
        load_request_tests(tmp_path)
    [issue] = info.value.issues
    assert (issue.file, issue.line, issue.field) == (str(tmp_path / "bad.yaml"), line, field)
    assert message in issue.message
    assert str(issue).startswith(f"{tmp_path / 'bad.yaml'}:{line}: ")


def test_every_problem_of_every_file_is_reported(tmp_path: Path) -> None:
    write(tmp_path, {"a.yaml": MALFORMED[2][0], "b.yaml": MALFORMED[3][0], "ok.yaml": TESTS})
    with pytest.raises(PolicyLoadError) as info:
        load_request_tests(tmp_path)
    assert [(Path(i.file).name, i.field) for i in info.value.issues] == [
        ("a.yaml", "tests[0].expect"),
        ("b.yaml", "tests[0].expect.allowed"),
    ]


def test_a_single_request_for_eval(tmp_path: Path) -> None:
    write(tmp_path, {"r.yaml": "request: {path: /x, destination: {namespace: ns}}\n"})
    test = load_request_test(tmp_path / "r.yaml")
    assert (test.name, test.expect, test.request.path) == ("r", None, "/x")
    write(tmp_path, {"bad.yaml": "request: {path: x}\nexpect: {}\n"})
    with pytest.raises(PolicyLoadError) as info:
        load_request_test(tmp_path / "bad.yaml")
    assert [i.field for i in info.value.issues] == ["request.path", "expect.allowed"]


# -- the CheckRequest ----------------------------------------------------------------------


def test_the_check_request_is_what_envoy_sends() -> None:
    request = RequestUnderTest(
        path="/reviews/1?page=2",
        method="POST",
        principal=FRONTEND,
        headers={"content-type": "application/json", "x-b3": "1"},
        body='{"stars": 5}',
        destination=Destination(
            "default", {"app": "reviews", "version": "v1"}, "reviews", port=9080
        ),
    )
    check = build_check_request(request)
    view = build_view(check)
    assert view.source_principal == "example.org/ns/default/sa/frontend"
    assert (view.source_ip, view.destination_ip, view.destination_port) == (
        "10.0.0.2",
        "10.0.0.10",
        9080,
    )
    assert (view.workload_namespace, dict(view.workload_labels), view.workload_service) == (
        "default",
        {"app": "reviews", "version": "v1"},
        "reviews",
    )
    assert (view.method, view.host, view.path_without_query) == ("POST", "reviews", "/reviews/1")
    assert dict(view.headers) == {
        ":authority": "reviews",
        ":method": "POST",
        ":path": "/reviews/1?page=2",
        ":scheme": "http",
        "x-forwarded-proto": "http",
        "x-request-id": "meshward-policy-test",
        "content-type": "application/json",
        "x-b3": "1",
        "content-length": "12",
    }
    document = build_input(check, view).document
    assert document["parsed_body"] == {"stars": 5}
    assert document["parsed_query"] == {"page": ["2"]}
    assert document["attributes"]["request"]["http"]["size"] == "12"


def test_a_body_over_the_limit_is_cut_as_envoy_cuts_it() -> None:
    request = RequestUnderTest(path="/", method="POST", body="x" * 20)
    http = build_check_request(request, max_request_bytes=8).attributes.request.http
    assert (http.body, http.size) == ("x" * 8, 20)
    assert http.headers["x-envoy-auth-partial-body"] == "true"
    assert http.headers["content-length"] == "20"


def test_bearer_claims_become_an_unsigned_token() -> None:
    check = build_check_request(RequestUnderTest(path="/", bearer={"sub": "alice", "n": [1]}))
    scheme, token = check.attributes.request.http.headers["authorization"].split(" ")
    header, payload, signature = token.split(".")
    assert scheme == "Bearer"
    assert signature == ""

    def decoded(part: str) -> Any:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    assert decoded(header) == {"alg": "none", "typ": "JWT"}
    assert decoded(payload) == {"sub": "alice", "n": [1]}


def test_no_principal_and_no_destination_leave_the_fields_unset() -> None:
    attrs = build_check_request(RequestUnderTest(path="/")).attributes
    assert attrs.source.principal == ""
    assert dict(attrs.context_extensions) == {}
    assert attrs.request.http.host == "localhost"


# -- running -------------------------------------------------------------------------------


def test_passing_tests(tmp_path: Path) -> None:
    authz, sink = servicer(tmp_path)
    results = [
        run_request_test(t, authz, sink)
        for t in load_request_tests(write(tmp_path, {"t/a.yaml": TESTS}) / "t")
    ]
    assert [(r.test.name, r.outcome, r.mismatches) for r in results] == [
        ("reads", RequestTestOutcome.PASSED, ()),
        ("writes", RequestTestOutcome.PASSED, ()),
    ]
    assert results[0].as_dict()["result"] == "pass"
    assert "got" not in results[0].as_dict()


def test_a_failing_test_says_what_was_expected_and_what_came(tmp_path: Path) -> None:
    authz, sink = servicer(tmp_path)
    test = one(
        tmp_path,
        "- name: wrong\n"
        "  request:\n"
        "    principal: spiffe://example.org/ns/default/sa/frontend\n"
        "    path: /reviews\n"
        "    destination: {namespace: default, labels: {app: reviews}}\n"
        "  expect:\n"
        "    allowed: true\n"
        "    policy: default.other[rules[0]]\n"
        "    upstream_headers: {x-user: alice}\n"
        "    dry_run: null\n",
    )
    result = run_request_test(test, authz, sink)
    assert result.outcome is RequestTestOutcome.FAILED
    assert [str(m) for m in result.mismatches] == [
        "policy: expected default.other[rules[0]], got default.viewer[rules[0]]",
        "upstream_headers.x-user: expected alice, got none",
        "dry_run: expected none, got "
        '{"istio_dry_run_deny_shadow_effective_policy_id": "default.want-trace[rules[0]]", '
        '"istio_dry_run_deny_shadow_engine_result": "denied"}',
    ]
    report = result.as_dict()
    assert report["result"] == "fail"
    assert report["got"]["policy"] == "default.viewer[rules[0]]"
    assert report["mismatches"][0] == {
        "field": "policy",
        "expected": "default.other[rules[0]]",
        "got": "default.viewer[rules[0]]",
    }


def test_rego_decisions_status_body_and_headers(tmp_path: Path) -> None:
    authz, sink = servicer(tmp_path)
    destination = "    destination: {namespace: default, labels: {app: admin}}\n"
    denied = one(
        tmp_path / "a",
        "- name: no token\n  request:\n    path: /\n" + destination + "  expect:\n"
        "    allowed: false\n    status: 401\n    body: log in\n    engine: rego\n"
        "    policy: default.console[rules[0]]\n"
        "    response_headers: {www-authenticate: Bearer, content-type: null}\n",
    )
    allowed = one(
        tmp_path / "b",
        "- name: alice\n  request:\n    path: /\n    bearer: {sub: alice}\n"
        + destination
        + "  expect:\n    allowed: true\n    engine: rego\n"
        "    upstream_headers: {x-user: alice}\n    removed_headers: [Authorization]\n",
    )
    for test in (denied, allowed):
        result = run_request_test(test, authz, sink)
        assert result.outcome is RequestTestOutcome.PASSED, result.detail


def test_a_decision_without_a_record_is_an_error(tmp_path: Path) -> None:
    class Silent:
        def decide(self, request: Any) -> Any:
            return external_auth_pb2.CheckResponse()  # an OK, but no record

    test = one(
        tmp_path,
        "- name: x\n  request: {path: /, destination: {namespace: d}}\n  expect: {allowed: true}\n",
    )
    result = run_request_test(test, Silent(), MemorySink())
    assert result.outcome is RequestTestOutcome.ERRORED
    assert result.detail == "the decision wrote no audit record"


def observed(**changes: Any) -> Observed:
    base: dict[str, Any] = {
        "allowed": False,
        "reason": "denied_by_policy",
        "policy": "ns.p[rules[0]]",
        "engine": "istio",
        "status": 403,
        "body": "RBAC: access denied",
        "upstream_headers": {},
        "removed_headers": (),
        "response_headers": {"content-type": "text/plain"},
        "dry_run": {},
    }
    return Observed(**(base | changes))


@pytest.mark.parametrize(
    ("expect", "got", "mismatches"),
    [
        (Expectation(allowed=False), observed(), []),
        (Expectation(allowed=True), observed(), ["allowed: expected true, got false"]),
        (Expectation(allowed=False, status=401), observed(), ["status: expected 401, got 403"]),
        # policy: null is an expectation; no policy key is none.
        (
            Expectation(allowed=False, expects_policy=True),
            observed(),
            ["policy: expected none, got ns.p[rules[0]]"],
        ),
        (Expectation(allowed=False), observed(policy=None), []),
        (
            Expectation(allowed=False, body=" x"),
            observed(),
            ['body: expected " x", got RBAC: access denied'],
        ),
        (
            Expectation(allowed=False, response_headers={"content-type": None}),
            observed(),
            ["response_headers.content-type: expected none, got text/plain"],
        ),
        (
            Expectation(allowed=False, dry_run={"k": "v"}, expects_dry_run=True),
            observed(dry_run={"k": "v", "other": "x"}),
            [],
        ),
        (
            Expectation(
                allowed=False,
                dry_run={"meshward_rego_dry_run_shadow_result": "denied"},
                expects_dry_run=True,
            ),
            observed(),
            ["dry_run.rego_shadow: expected denied, got none"],
        ),
    ],
)
def test_compare(expect: Expectation, got: Observed, mismatches: list[str]) -> None:
    assert [str(m) for m in compare(expect, got)] == mismatches
