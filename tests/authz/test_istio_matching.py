"""Table-driven matching semantics: every source/operation field, operator, not* form and when key.

Each case is one ALLOW rule in namespace ``default`` and one request; the request
is allowed exactly when the rule matches it (the only ALLOW policy applies).
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from authz.istio_engine import evaluate
from authz.istio_loader import parse_documents
from authz.request_view import RequestView

WEB = "example.org/ns/default/sa/web"
JWT = {
    "iss": "https://issuer.example",
    "sub": "alice",
    "aud": ["api", "admin"],
    "azp": "cli",
    "groups": ["dev", "ops"],
    "tier": "gold",
    "org": {"team": "payments", "tags": ["a", "b"]},
    "admin": True,
}


def rule_matches(rule: dict[str, Any], *, aliases: tuple[str, ...] = (), **view: Any) -> bool:
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"rules": [rule]},
    }
    policies = parse_documents(
        yaml.safe_dump(doc), trust_domain="example.org", trust_domain_aliases=aliases
    )
    defaults: dict[str, Any] = {
        "workload_namespace": "default",
        "source_principal": WEB,
        "source_ip": "10.1.2.3",
        "remote_ip": "203.0.113.9",
        "destination_ip": "10.9.0.5",
        "destination_port": 8080,
        "method": "GET",
        "host": "api.example.com",
        "path": "/v1/items/42?x=1",
        "headers": {"x-team": "blue", "user-agent": "Mozilla/5.0"},
        "sni": "api.example.com",
        "request_auth": JWT,
        "filter_metadata": {"envoy.filters.network.mysql_proxy": {"db.table": ["insert"]}},
    }
    defaults.update(view)
    return evaluate(policies, RequestView(**defaults)).allowed


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(
    key: str, values: list[str] | None = None, not_values: list[str] | None = None
) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return {"when": [cond]}


CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # --- principals: exact, prefix, suffix, presence, not*
    ("principal exact", src(principals=[WEB]), {}, True),
    ("principal exact other", src(principals=["example.org/ns/default/sa/db"]), {}, False),
    ("principal prefix", src(principals=["example.org/ns/default/*"]), {}, True),
    ("principal suffix", src(principals=["*/sa/web"]), {}, True),
    ("principal suffix miss", src(principals=["*/sa/db"]), {}, False),
    # cluster.local stands for the local trust domain (and its aliases), as in istiod
    ("principal in cluster.local", src(principals=["cluster.local/ns/default/sa/web"]), {}, True),
    (
        "principal prefix in cluster.local",
        src(principals=["cluster.local/ns/default/*"]),
        {},
        True,
    ),
    (
        "principal in cluster.local, a foreign peer",
        src(principals=["cluster.local/ns/default/sa/web"]),
        {"source_principal": "other.org/ns/default/sa/web"},
        False,
    ),
    (
        "notPrincipals in cluster.local",
        src(notPrincipals=["cluster.local/ns/default/sa/web"]),
        {},
        False,
    ),
    ("principal presence", src(principals=["*"]), {}, True),
    ("principal presence without mTLS", src(principals=["*"]), {"source_principal": None}, False),
    ("principal values ORed", src(principals=["x/ns/a/sa/b", WEB]), {}, True),
    ("notPrincipals hit", src(notPrincipals=[WEB]), {}, False),
    ("notPrincipals miss", src(notPrincipals=["*/sa/db"]), {}, True),
    ("notPrincipals without mTLS", src(notPrincipals=["*"]), {"source_principal": None}, True),
    ("principal middle star is literal", src(principals=["example.org/ns/*/sa/web"]), {}, False),
    # --- requestPrincipals (iss/sub of the verified JWT)
    ("requestPrincipals exact", src(requestPrincipals=["https://issuer.example/alice"]), {}, True),
    ("requestPrincipals presence", src(requestPrincipals=["*"]), {}, True),
    ("requestPrincipals no JWT", src(requestPrincipals=["*"]), {"request_auth": None}, False),
    ("notRequestPrincipals", src(notRequestPrincipals=["*/alice"]), {}, False),
    # --- namespaces
    ("namespaces exact", src(namespaces=["default"]), {}, True),
    ("namespaces prefix", src(namespaces=["def*"]), {}, True),
    ("namespaces miss", src(namespaces=["prod"]), {}, False),
    ("namespaces need a principal", src(namespaces=["default"]), {"source_principal": None}, False),
    ("notNamespaces", src(notNamespaces=["default"]), {}, False),
    # --- serviceAccounts (ns/name, any trust domain)
    ("serviceAccounts", src(serviceAccounts=["default/web"]), {}, True),
    (
        "serviceAccounts other td",
        src(serviceAccounts=["default/web"]),
        {"source_principal": "other.org/ns/default/sa/web"},
        True,
    ),
    ("serviceAccounts miss", src(serviceAccounts=["prod/web"]), {}, False),
    ("notServiceAccounts", src(notServiceAccounts=["default/web"]), {}, False),
    # <serviceaccount> alone: the policy's own namespace (Istio's API), default here
    ("serviceAccounts, own namespace", src(serviceAccounts=["web"]), {}, True),
    (
        "serviceAccounts, own namespace only",
        src(serviceAccounts=["web"]),
        {"source_principal": "example.org/ns/prod/sa/web"},
        False,
    ),
    ("notServiceAccounts, own namespace", src(notServiceAccounts=["web"]), {}, False),
    # --- trustDomains
    ("trustDomains", src(trustDomains=["example.org"]), {}, True),
    ("trustDomains miss", src(trustDomains=["other.org"]), {}, False),
    ("notTrustDomains", src(notTrustDomains=["example.org"]), {}, False),
    # --- ipBlocks / remoteIpBlocks
    ("ipBlocks CIDR", src(ipBlocks=["10.1.0.0/16"]), {}, True),
    ("ipBlocks single IP", src(ipBlocks=["10.1.2.3"]), {}, True),
    ("ipBlocks miss", src(ipBlocks=["10.2.0.0/16"]), {}, False),
    ("ipBlocks IPv6", src(ipBlocks=["fd00::/8"]), {"source_ip": "fd00::1"}, True),
    ("ipBlocks v4 rule v6 request", src(ipBlocks=["10.0.0.0/8"]), {"source_ip": "fd00::1"}, False),
    ("ipBlocks host bits", src(ipBlocks=["10.1.2.99/24"]), {}, True),
    ("notIpBlocks", src(notIpBlocks=["10.0.0.0/8"]), {}, False),
    ("remoteIpBlocks", src(remoteIpBlocks=["203.0.113.0/24"]), {}, True),
    ("remoteIpBlocks not source ip", src(remoteIpBlocks=["10.1.2.3"]), {}, False),
    ("notRemoteIpBlocks", src(notRemoteIpBlocks=["203.0.113.0/24"]), {}, False),
    # --- fields in a source are ANDed, sources ORed
    ("source fields ANDed", src(namespaces=["default"], ipBlocks=["10.2.0.0/16"]), {}, False),
    (
        "sources ORed",
        {"from": [{"source": {"namespaces": ["prod"]}}, {"source": {"ipBlocks": ["10.0.0.0/8"]}}]},
        {},
        True,
    ),
    ("positive and not forms", src(principals=["*"], notPrincipals=[WEB]), {}, False),
    # --- hosts: case-insensitive, host:port forms
    ("hosts exact", op(hosts=["api.example.com"]), {}, True),
    ("hosts case-insensitive", op(hosts=["API.Example.COM"]), {}, True),
    ("hosts request upper", op(hosts=["api.example.com"]), {"host": "API.EXAMPLE.com"}, True),
    ("hosts with port", op(hosts=["api.example.com"]), {"host": "api.example.com:8080"}, True),
    (
        "hosts explicit port",
        op(hosts=["api.example.com:8080"]),
        {"host": "api.example.com:8080"},
        True,
    ),
    (
        "hosts wrong explicit port",
        op(hosts=["api.example.com:9090"]),
        {"host": "api.example.com:8080"},
        False,
    ),
    ("hosts suffix", op(hosts=["*.example.com"]), {"host": "api.example.com:443"}, True),
    ("hosts prefix", op(hosts=["api.*"]), {}, True),
    ("hosts miss", op(hosts=["web.example.com"]), {}, False),
    ("hosts ipv6 with port", op(hosts=["[::1]"]), {"host": "[::1]:80"}, True),
    ("notHosts", op(notHosts=["*.example.com"]), {}, False),
    # Case-insensitive as DNS and Envoy's ignore_case are: A-Z only (the Kelvin sign
    # U+212A lowercases to "k" in Unicode), and a port is ASCII digits.
    ("hosts ASCII case only", op(hosts=["k.example.com"]), {"host": "\u212a.example.com"}, False),
    (
        "hosts port ASCII digits only",
        op(hosts=["api.example.com"]),
        {"host": "api.example.com:\uff18\uff10"},
        False,
    ),
    # --- ports
    ("ports", op(ports=["8080"]), {}, True),
    ("ports miss", op(ports=["80"]), {}, False),
    ("notPorts", op(notPorts=["8080"]), {}, False),
    # --- methods: exact, case-sensitive
    ("methods", op(methods=["GET", "HEAD"]), {}, True),
    ("methods case-sensitive", op(methods=["get"]), {}, False),
    ("notMethods", op(notMethods=["GET"]), {}, False),
    ("notMethods miss", op(notMethods=["POST"]), {}, True),
    # --- paths: no query, exact/prefix/suffix, templates
    ("paths exact ignores query", op(paths=["/v1/items/42"]), {}, True),
    ("paths exact ignores fragment", op(paths=["/v1/items/42"]), {"path": "/v1/items/42#f"}, True),
    ("paths prefix", op(paths=["/v1/*"]), {}, True),
    ("paths suffix", op(paths=["*/42"]), {}, True),
    ("paths query not matched by suffix", op(paths=["*x=1"]), {}, False),
    ("paths miss", op(paths=["/v2/*"]), {}, False),
    ("template {*} one segment", op(paths=["/v1/{*}/42"]), {}, True),
    ("template {*} not two", op(paths=["/v1/{*}"]), {}, False),
    ("template {*} not empty", op(paths=["/v1/items/{*}"]), {"path": "/v1/items/"}, False),
    ("template {**} rest", op(paths=["/v1/{**}"]), {}, True),
    ("template {**} zero segments", op(paths=["/v1/{**}"]), {"path": "/v1/"}, True),
    ("template {**} needs the slash", op(paths=["/v1/{**}"]), {"path": "/v1"}, False),
    ("template {*} then {**}", op(paths=["/{*}/items/{**}"]), {}, True),
    ("template {**} then literal", op(paths=["/v1/{**}/42"]), {}, True),
    (
        "template literal escaped",
        op(paths=["/v1/{*}/4.".replace(".", "2")]),
        {"path": "/v1/items/42"},
        True,
    ),
    ("template regex chars literal", op(paths=["/a.b/{*}"]), {"path": "/axb/c"}, False),
    ("notPaths template", op(notPaths=["/v1/{**}"]), {}, False),
    # --- operations: fields ANDed, operations ORed
    ("operation fields ANDed", op(methods=["GET"], paths=["/admin"]), {}, False),
    (
        "operations ORed",
        {"to": [{"operation": {"methods": ["POST"]}}, {"operation": {"ports": ["8080"]}}]},
        {},
        True,
    ),
    (
        "from, to and when ANDed",
        {
            **src(namespaces=["default"]),
            **op(methods=["GET"]),
            **when("source.ip", ["192.168.0.0/16"]),
        },
        {},
        False,
    ),
    # --- when keys
    ("when header", when("request.headers[X-Team]", ["blue"]), {}, True),
    ("when header prefix", when("request.headers[User-Agent]", ["Mozilla/*"]), {}, True),
    ("when header absent", when("request.headers[x-missing]", ["*"]), {}, False),
    ("when header notValues", when("request.headers[x-team]", not_values=["blue"]), {}, False),
    ("when source.ip", when("source.ip", ["10.1.2.0/24"]), {}, True),
    ("when remote.ip", when("remote.ip", ["203.0.113.9"]), {}, True),
    ("when remote.ip notValues", when("remote.ip", not_values=["203.0.113.0/24"]), {}, False),
    ("when source.namespace", when("source.namespace", ["default"]), {}, True),
    ("when source.principal", when("source.principal", [WEB]), {}, True),
    ("when source.serviceAccount", when("source.serviceAccount", ["default/web"]), {}, True),
    ("when source.trustDomain", when("source.trustDomain", ["example.org"]), {}, True),
    (
        "when request.auth.principal",
        when("request.auth.principal", ["https://issuer.example/alice"]),
        {},
        True,
    ),
    ("when audiences list", when("request.auth.audiences", ["admin"]), {}, True),
    ("when audiences miss", when("request.auth.audiences", ["other"]), {}, False),
    (
        "when audiences string",
        when("request.auth.audiences", ["api"]),
        {"request_auth": {**JWT, "aud": "api"}},
        True,
    ),
    ("when presenter", when("request.auth.presenter", ["cli"]), {}, True),
    ("when claim string", when("request.auth.claims[tier]", ["gold"]), {}, True),
    ("when claim list", when("request.auth.claims[groups]", ["ops"]), {}, True),
    (
        "when claim list notValues",
        when("request.auth.claims[groups]", not_values=["ops"]),
        {},
        False,
    ),
    ("when nested claim", when("request.auth.claims[org][team]", ["pay*"]), {}, True),
    ("when nested claim list", when("request.auth.claims[org][tags]", ["b"]), {}, True),
    ("when claim non-string", when("request.auth.claims[admin]", ["true"]), {}, False),
    ("when claim absent", when("request.auth.claims[nope]", ["*"]), {}, False),
    (
        "when claims no JWT",
        when("request.auth.claims[tier]", ["gold"]),
        {"request_auth": None},
        False,
    ),
    ("when destination.ip", when("destination.ip", ["10.9.0.0/16"]), {}, True),
    ("when destination.port", when("destination.port", ["8080"]), {}, True),
    ("when destination.port miss", when("destination.port", ["80"]), {}, False),
    ("when connection.sni", when("connection.sni", ["*.example.com"]), {}, True),
    (
        "when filter metadata list",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[insert]"]),
        {},
        True,
    ),
    (
        "when filter metadata list miss",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[update]"]),
        {},
        False,
    ),
    (
        "when filter metadata plain vs list",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["insert"]),
        {},
        False,
    ),
    (
        "when filter metadata string",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["ins*"]),
        {"filter_metadata": {"envoy.filters.network.mysql_proxy": {"db.table": "insert"}}},
        True,
    ),
    (
        "when filter metadata list vs string",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[insert]"]),
        {"filter_metadata": {"envoy.filters.network.mysql_proxy": {"db.table": "insert"}}},
        False,
    ),
    (
        "when filter metadata other filter",
        when("experimental.envoy.filters.http.other[db.table]", ["[insert]"]),
        {},
        False,
    ),
    (
        "when filter metadata notValues",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", not_values=["[insert]"]),
        {},
        False,
    ),
    ("when values and notValues", when("request.headers[x-team]", ["*"], ["blue"]), {}, False),
    (
        "when conditions ANDed",
        {
            "when": [
                {"key": "source.ip", "values": ["10.0.0.0/8"]},
                {"key": "destination.port", "values": ["80"]},
            ]
        },
        {},
        False,
    ),
]


@pytest.mark.parametrize(
    ("rule", "view", "expected"),
    [pytest.param(rule, view, expected, id=name) for name, rule, view, expected in CASES],
)
def test_rule_matching(rule: dict[str, Any], view: dict[str, Any], expected: bool) -> None:
    assert rule_matches(rule, **view) is expected


ALIAS_CASES: list[tuple[str, str, str, bool]] = [
    # policy principal, request principal, expected (trust domain example.org, alias old.org)
    (
        "local policy, alias peer",
        "example.org/ns/default/sa/web",
        "old.org/ns/default/sa/web",
        True,
    ),
    (
        "alias policy, local peer",
        "old.org/ns/default/sa/web",
        "example.org/ns/default/sa/web",
        True,
    ),
    ("prefix policy, alias peer", "example.org/ns/default/*", "old.org/ns/default/sa/x", True),
    (
        "foreign policy, alias peer",
        "other.org/ns/default/sa/web",
        "old.org/ns/default/sa/web",
        False,
    ),
    (
        "local policy, foreign peer",
        "example.org/ns/default/sa/web",
        "other.org/ns/default/sa/web",
        False,
    ),
]


@pytest.mark.parametrize(
    ("policy_principal", "peer", "expected"),
    [pytest.param(p, r, e, id=n) for n, p, r, e in ALIAS_CASES],
)
def test_trust_domain_aliases(policy_principal: str, peer: str, expected: bool) -> None:
    for rule in (src(principals=[policy_principal]), when("source.principal", [policy_principal])):
        assert rule_matches(rule, aliases=("old.org",), source_principal=peer) is expected


def test_trust_domain_alias_in_trust_domains_field() -> None:
    rule = src(trustDomains=["example.org"])
    assert rule_matches(rule, aliases=("old.org",), source_principal="old.org/ns/a/sa/b")
    assert not rule_matches(rule, source_principal="old.org/ns/a/sa/b")
