"""Lint warnings: each fires where the policy cannot do what it looks like, and only there."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from authz.errors import PolicyIssue
from authz.istio_lint import LintFinding, Severity, lint
from authz.istio_loader import parse_documents

FILE = "policies/istio/p.yaml"
TD = "example.org"
GET: list[Any] = [{"to": [{"operation": {"methods": ["GET"]}}]}]
EVERYTHING: list[Any] = [{}]


def policy(
    name: str = "a",
    *,
    namespace: str = "web",
    action: str | None = None,
    rules: list[Any] | None = None,
    dry_run: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = dict(spec)
    if action is not None:
        body["action"] = action
    if rules is not None:
        body["rules"] = rules
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if dry_run:
        meta["annotations"] = {"istio.io/dry-run": "true"}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": meta,
        "spec": body,
    }


def source(**fields: Any) -> list[Any]:
    return [{"from": [{"source": fields}]}]


def operation(**fields: Any) -> list[Any]:
    return [{"to": [{"operation": fields}]}]


def when(*conditions: dict[str, Any]) -> list[Any]:
    return [{"when": list(conditions)}]


def app(name: str) -> dict[str, Any]:
    return {"matchLabels": {"app": name}}


def findings(
    *docs: dict[str, Any], aliases: tuple[str, ...] = (), texts: bool = True
) -> list[LintFinding]:
    text = yaml.safe_dump_all(docs)
    policies = parse_documents(text, file=FILE, trust_domain=TD, trust_domain_aliases=aliases)
    return lint(
        policies, trust_domain=TD, trust_domain_aliases=aliases, texts={FILE: text} if texts else {}
    )


# (case, policies, [(document, field, text the message must contain)])
WARNING_CASES: list[tuple[str, list[dict[str, Any]], list[tuple[int, str, str]]]] = [
    (
        "ALLOW without rules",
        [policy("lock", selector=app("api"))],
        [
            (
                0,
                "spec.rules",
                "ALLOW policy web/lock has no rules, so it matches no request: every workload "
                "it selects now denies every request that no other ALLOW policy allows",
            )
        ],
    ),
    (
        "ALLOW without rules in the root namespace names the whole mesh",
        [policy("lock", namespace="istio-system")],
        [(0, "spec.rules", "every workload in the mesh now denies every request")],
    ),
    (
        "ALLOW with rules in the root namespace, no selector",
        [policy("mesh", namespace="istio-system", rules=GET)],
        [(0, "spec", "so it applies to every workload in the mesh")],
    ),
    (
        "ALLOW: HTTP-only field with a TCP port",
        [policy(rules=operation(ports=["5432"], methods=["GET"]))],
        [
            (
                0,
                "spec.rules[0].to[0].operation.methods",
                "ALLOW rule with HTTP-only fields (methods): never matches on TCP connections, "
                "so it never allows the TCP port 5432 (PostgreSQL) it names",
            )
        ],
    ),
    (
        "ALLOW: HTTP-only field in another operation still drops the whole rule",
        [
            policy(
                rules=[
                    {"to": [{"operation": {"ports": ["6379"]}}, {"operation": {"paths": ["/x"]}}]}
                ]
            )
        ],
        [(0, "spec.rules[0].to[1].operation.paths", "ALLOW rule with HTTP-only fields (paths)")],
    ),
    (
        "DENY: HTTP-only field with a TCP port",
        [
            policy(
                action="DENY",
                rules=[
                    {
                        "from": [{"source": {"requestPrincipals": ["*"]}}],
                        "to": [{"operation": {"ports": ["6379", "3306"]}}],
                    }
                ],
            )
        ],
        [
            (
                0,
                "spec.rules[0].from[0].source.requestPrincipals",
                "DENY rule with HTTP-only fields (requestPrincipals): on a TCP connection Istio "
                "ignores these fields, so this DENY matches more than it looks: it denies every "
                "connection to TCP ports 3306 (MySQL), 6379 (Redis)",
            )
        ],
    ),
    (
        "DENY: a header condition with a destination.port condition",
        [
            policy(
                action="DENY",
                rules=when(
                    {"key": "destination.port", "values": ["9092"]},
                    {"key": "request.headers[x-user]", "values": ["bob"]},
                ),
            )
        ],
        [
            (
                0,
                "spec.rules[0].when[1].values",
                "DENY rule with HTTP-only fields (request.headers[x-user])",
            )
        ],
    ),
    (
        "principal in a foreign trust domain",
        [policy(rules=source(principals=["example.org/ns/a/sa/b", "other.org/ns/a/sa/*"]))],
        [
            (
                0,
                "spec.rules[0].from[0].source.principals[1]",
                "principal 'other.org/ns/a/sa/*' is in trust domain 'other.org', which is "
                "neither the trust domain 'example.org' nor one of authz.trust_domain_aliases, "
                "so it never matches; correct the trust domain or add it to "
                "authz.trust_domain_aliases",
            )
        ],
    ),
    (
        "principal with spiffe://",
        [policy(rules=source(principals=["spiffe://example.org/ns/a/sa/b"]))],
        [
            (
                0,
                "spec.rules[0].from[0].source.principals[0]",
                "starts with 'spiffe://', which principals never do, so it never matches; "
                "write 'example.org/ns/a/sa/b'",
            )
        ],
    ),
    (
        "a cluster.local principal is the local trust domain, as in Istio",
        [policy(rules=source(notPrincipals=["cluster.local/ns/a/sa/b"]))],
        [],
    ),
    (
        "a cluster.local trust domain is not",
        [policy(rules=source(notTrustDomains=["cluster.local"]))],
        [
            (
                0,
                "spec.rules[0].from[0].source.notTrustDomains[0]",
                "(cluster.local names the local trust domain in principals only), so it never "
                "matches and excludes nothing",
            )
        ],
    ),
    (
        "trustDomains and when source.trustDomain / source.principal",
        [
            policy(
                rules=[
                    {
                        "from": [{"source": {"trustDomains": ["other.org"]}}],
                        "when": [
                            {"key": "source.trustDomain", "values": ["example.org", "far.org"]},
                            {"key": "source.principal", "notValues": ["far.org/ns/x/sa/y"]},
                        ],
                    }
                ]
            )
        ],
        [
            (0, "spec.rules[0].from[0].source.trustDomains[0]", "trust domain 'other.org' is"),
            (0, "spec.rules[0].when[0].values[1]", "trust domain 'far.org' is neither"),
            (0, "spec.rules[0].when[1].notValues[0]", "never matches and excludes nothing"),
        ],
    ),
    (
        "DENY everything in the namespace shadows an ALLOW",
        [
            policy("allow-get", selector=app("api"), rules=GET),
            policy("d", action="DENY", rules=EVERYTHING),
        ],
        [
            (
                1,
                "spec.rules[0]",
                "DENY rule matches every request and applies to every workload that ALLOW "
                f"policy web/allow-get ({FILE}[0]) selects, so that policy can never allow "
                "anything (DENY is checked first)",
            )
        ],
    ),
    (
        "mesh-wide DENY of everything shadows ALLOWs in every namespace",
        [
            policy("d", namespace="istio-system", action="DENY", rules=[{}, {"when": []}]),
            policy("a", namespace="web", rules=GET),
            policy("b", namespace="db", targetRefs=[{"kind": "Service", "name": "pg"}], rules=GET),
        ],
        [(0, "spec.rules[0]", "ALLOW policies web/a (")],
    ),
    (
        "DENY with a selector shadows an ALLOW whose selector includes its labels",
        [
            policy("d", action="DENY", selector=app("api"), rules=EVERYTHING),
            policy("a", selector={"matchLabels": {"app": "api", "v": "1"}}, rules=GET),
        ],
        [(0, "spec.rules[0]", "ALLOW policy web/a")],
    ),
    (
        "path without a leading slash",
        [policy(rules=operation(paths=["/ok", "api/users"], notPaths=["health*"]))],
        [
            (
                0,
                "spec.rules[0].to[0].operation.paths[1]",
                "path 'api/users' does not start with '/' as every request path does, so it "
                "never matches; write '/api/users'",
            ),
            (0, "spec.rules[0].to[0].operation.notPaths[0]", "excludes nothing"),
        ],
    ),
    (
        "lowercase method",
        [policy(rules=operation(methods=["GET", "post"]))],
        [
            (
                0,
                "spec.rules[0].to[0].operation.methods[1]",
                "method 'post' is not 'POST': methods are case-sensitive, so it never matches; "
                "write 'POST'",
            )
        ],
    ),
]

# (case, policies, trust-domain aliases): correct policies, no warning.
CLEAN_CASES: list[tuple[str, list[dict[str, Any]], tuple[str, ...]]] = [
    ("ALLOW with a rule", [policy(selector=app("api"), rules=EVERYTHING)], ()),
    ("dry-run ALLOW without rules", [policy(dry_run=True)], ()),
    (
        "root-namespace ALLOW with a selector",
        [policy(namespace="istio-system", selector=app("ingress"), rules=GET)],
        (),
    ),
    (
        "ALLOW: HTTP-only field with an HTTP port",
        [policy(rules=operation(ports=["8080"], methods=["GET"]))],
        (),
    ),
    (
        "ALLOW: a TCP port with an HTTP port in the same list",
        [policy(rules=operation(ports=["5432", "8080"], paths=["/x"]))],
        (),
    ),
    ("ALLOW: TCP port without HTTP-only fields", [policy(rules=operation(ports=["5432"]))], ()),
    (
        "DENY: TCP port without HTTP-only fields",
        [policy(action="DENY", rules=operation(ports=["6379"]))],
        (),
    ),
    (
        "DENY: notPorts is not a TCP-only rule",
        [policy(action="DENY", rules=operation(notPorts=["5432"], methods=["POST"]))],
        (),
    ),
    (
        "principals in the trust domain, an alias, or not spelt out",
        [
            policy(
                rules=source(
                    principals=["example.org/ns/a/sa/b", "old.org/ns/a/*", "*", "*/sa/b", "other*"]
                )
            )
        ],
        ("old.org",),
    ),
    (
        "trust domains in the trust domain, an alias, or a prefix",
        [
            policy(
                rules=[
                    {
                        "from": [{"source": {"trustDomains": ["example.org", "old.org", "far*"]}}],
                        "when": [{"key": "source.principal", "values": ["old.org/ns/x/sa/y"]}],
                    }
                ]
            )
        ],
        ("old.org",),
    ),
    (
        "DENY everything with no ALLOW in scope",
        [
            policy("d", action="DENY", selector=app("db"), rules=EVERYTHING),
            policy("a", selector=app("api"), rules=GET),
            policy("b", namespace="other", rules=GET),
        ],
        (),
    ),
    (
        "DENY with a condition does not shadow",
        [
            policy("d", action="DENY", rules=source(notNamespaces=["web"])),
            policy("a", selector=app("api"), rules=GET),
        ],
        (),
    ),
    (
        "dry-run DENY of everything does not shadow",
        [
            policy("d", action="DENY", rules=EVERYTHING, dry_run=True),
            policy("a", rules=GET),
        ],
        (),
    ),
    (
        "namespace DENY of everything does not reach a root-namespace ALLOW",
        [
            policy("d", action="DENY", rules=EVERYTHING),
            policy("a", namespace="istio-system", selector=app("api"), rules=GET),
        ],
        (),
    ),
    (
        "DENY with a selector does not shadow a namespace-wide ALLOW",
        [
            policy("d", action="DENY", selector=app("api"), rules=EVERYTHING),
            policy("a", rules=GET),
        ],
        (),
    ),
    (
        "paths that start with / or *",
        [policy(rules=operation(paths=["/api/{*}", "*.js", "*"]))],
        (),
    ),
    (
        "methods in capitals, and an unknown lowercase one",
        [policy(rules=operation(methods=["GET", "purge"]))],
        (),
    ),
    (
        "when with notValues only",
        [policy(rules=when({"key": "source.ip", "values": [], "notValues": ["10.0.0.0/8"]}))],
        (),
    ),
    (
        "source with one empty list beside a full one",
        [policy(rules=source(principals=[], namespaces=["x"]))],
        (),
    ),
]


@pytest.mark.parametrize(
    ("docs", "expected"), [c[1:] for c in WARNING_CASES], ids=[c[0] for c in WARNING_CASES]
)
def test_warns(docs: list[dict[str, Any]], expected: list[tuple[int, str, str]]) -> None:
    got = findings(*docs)
    assert [(f.document, f.field) for f in got] == [(d, field) for d, field, _ in expected]
    for finding, (_, _, text) in zip(got, expected, strict=True):
        assert text in finding.message
        assert finding.severity is Severity.WARNING
        assert finding.file == FILE


@pytest.mark.parametrize(
    ("docs", "aliases"), [c[1:] for c in CLEAN_CASES], ids=[c[0] for c in CLEAN_CASES]
)
def test_correct_policies_do_not_warn(docs: list[dict[str, Any]], aliases: tuple[str, ...]) -> None:
    assert findings(*docs, aliases=aliases) == []


def test_without_the_yaml_only_value_checks_are_skipped() -> None:
    docs = [policy(rules=operation(paths=["api"], ports=["5432"], methods=["GET"]))]
    assert [f.field for f in findings(*docs)] == [
        "spec.rules[0].to[0].operation.methods",
        "spec.rules[0].to[0].operation.paths[0]",
    ]
    assert [f.field for f in findings(*docs, texts=False)] == [
        "spec.rules[0].to[0].operation.methods"
    ]


def test_findings_are_ordered_by_file_and_document() -> None:
    got = findings(
        policy("d", action="DENY", rules=EVERYTHING),
        policy("a", rules=source(principals=["x.org/a"])),
        policy("b", namespace="istio-system"),
    )
    assert [(f.document, f.field) for f in got] == [
        (0, "spec.rules[0]"),
        (1, "spec.rules[0].from[0].source.principals[0]"),
        (2, "spec.rules"),
    ]


def test_finding_text_and_json_forms() -> None:
    warning = LintFinding("p.yaml", 2, "spec.rules[0]", "fix it")
    assert str(warning) == "warning: p.yaml[2] spec.rules[0]: fix it"
    error = LintFinding.from_issue(PolicyIssue("p.yaml", 0, "", "is not valid YAML"))
    assert str(error) == "error: p.yaml[0]: is not valid YAML"
    assert error.as_dict() == {
        "file": "p.yaml",
        "document": 0,
        "field": "",
        "message": "is not valid YAML",
        "severity": "error",
    }
