"""Translation of AuthorizationPolicy to Envoy RBAC filters: the proto-JSON for every field,
operator, not* form, template, action, dry-run and scope rule, and what is refused.

Expectations are written in the shapes istiod generates (pilot/pkg/security/authz), and
where the translation departs from them to decide as the engine does, the case says why.
That the filters decide like the engine is checked against a real Envoy in
tests/e2e/test_rbac_differential.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import json_format

from authz.errors import PolicyLoadError
from authz.istio_loader import parse_documents
from authz.istio_policy import PolicySet
from authz.rbac_translation import (
    ENVOY_RUNTIME,
    Family,
    RbacFilter,
    Workload,
    WorkloadRbac,
    ext_authz_enabled_metadata,
    parse_policy_name,
    translate,
    translation_issues,
)

API = Workload("default", {"app": "api", "version": "v1"}, "api")
ANY_STRING = {"safe_regex": {"regex": "(?s).*"}}


def policy(
    name: str = "p",
    *,
    namespace: str = "default",
    action: str = "ALLOW",
    rules: list[Any] | None = None,
    dry_run: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"action": action, **spec}
    if action == "CUSTOM":
        body["provider"] = {"name": "rego"}
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


def load(*docs: dict[str, Any], aliases: tuple[str, ...] = ()) -> PolicySet:
    return parse_documents(
        yaml.safe_dump_all(docs),
        file="policies.yaml",
        trust_domain="example.org",
        trust_domain_aliases=aliases,
    )


def rbac(*docs: dict[str, Any], workload: Workload = API, **kw: Any) -> WorkloadRbac:
    return translate(load(*docs, **kw), workload)


def slot(result: WorkloadRbac, name: str, family: Family = Family.HTTP) -> RbacFilter:
    filters = result.http if family is Family.HTTP else result.tcp
    (found,) = [f for f in filters if f.name == f"meshward.rbac.{family}.{name}"]
    return found


def only_policy(result: WorkloadRbac, name: str = "allow") -> dict[str, Any]:
    policies = slot(result, name).typed_config["rules"]["policies"]
    (single,) = policies.values()
    assert isinstance(single, dict)
    return single


# --- one clause: the principal or permission it becomes --------------------------------


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(
    key: str, values: list[str] | None = None, not_values: list[str] | None = None
) -> dict[str, Any]:
    condition: dict[str, Any] = {"key": key}
    if values is not None:
        condition["values"] = values
    if not_values is not None:
        condition["notValues"] = not_values
    return {"when": [condition]}


def authenticated(**name: Any) -> dict[str, Any]:
    return {"authenticated": {"principal_name": name}}


def regex(pattern: str) -> dict[str, Any]:
    return {"safe_regex": {"regex": pattern}}


def ors(*ids: Any) -> dict[str, Any]:
    return {"or_ids": {"ids": list(ids)}}


def or_rules(*rules: Any) -> dict[str, Any]:
    return {"or_rules": {"rules": list(rules)}}


def jwt(path: list[str], value: dict[str, Any]) -> dict[str, Any]:
    return {
        "sourced_metadata": {
            "metadata_matcher": {
                "filter": "envoy.filters.http.jwt_authn",
                "path": [{"key": key} for key in ["payload", *path]],
                "value": value,
            }
        }
    }


def iss_sub(iss: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    return {
        "and_ids": {
            "ids": [jwt(["iss"], {"string_match": iss}), jwt(["sub"], {"string_match": sub})]
        }
    }


def claim(path: list[str], *matchers: dict[str, Any]) -> dict[str, Any]:
    values = [{"string_match": m} for m in matchers]
    one_of = values[0] if len(values) == 1 else {"or_match": {"value_matchers": values}}
    return jwt(path, {"or_match": {"value_matchers": [{"list_match": {"one_of": one_of}}, one_of]}})


def authority(**string_match: Any) -> dict[str, Any]:
    return {"header": {"name": ":authority", "string_match": string_match}}


def host_with_port(first: dict[str, Any], port_regex: str) -> dict[str, Any]:
    return {"and_rules": {"rules": [first, authority(**regex(port_regex))]}}


NEVER_PRINCIPAL = {"not_id": {"any": True}}
SPIFFE_ID = "spiffe://[^/]*/ns/{ns}/sa/{sa}"

PRINCIPAL_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # The peer certificate's URI SAN, with spiffe:// (istiod's shape for exact and prefix).
    (
        "principals exact",
        src(principals=["example.org/ns/default/sa/web"]),
        ors(authenticated(exact="spiffe://example.org/ns/default/sa/web")),
    ),
    (
        "principals prefix",
        src(principals=["example.org/ns/default/*"]),
        ors(authenticated(prefix="spiffe://example.org/ns/default/")),
    ),
    # istiod: "spiffe://.*/sa/web.v2" with the dot unescaped; here escaped, any length.
    (
        "principals suffix",
        src(principals=["*/sa/web.v2"]),
        ors(authenticated(**regex(r"spiffe://(?s:.*)/sa/web\.v2"))),
    ),
    # istiod: ".+", which a certificate with only a DNS SAN matches; the engine needs SPIFFE.
    ("principals present", src(principals=["*"]), ors(authenticated(**regex("spiffe://(?s:.+)")))),
    (
        "notPrincipals",
        src(notPrincipals=["example.org/ns/default/sa/web", "*"]),
        {
            "not_id": ors(
                authenticated(exact="spiffe://example.org/ns/default/sa/web"),
                authenticated(**regex("spiffe://(?s:.+)")),
            )
        },
    ),
    # iss/sub: every split of the value at a '/' (istiod splits at the last one only,
    # which misses a sub holding a '/').
    (
        "requestPrincipals exact",
        src(requestPrincipals=["https://issuer.example/alice"]),
        ors(
            iss_sub({"exact": "https:"}, {"exact": "/issuer.example/alice"}),
            iss_sub({"exact": "https:/"}, {"exact": "issuer.example/alice"}),
            iss_sub({"exact": "https://issuer.example"}, {"exact": "alice"}),
        ),
    ),
    (
        "requestPrincipals one split",
        src(requestPrincipals=["issuer/alice"]),
        iss_sub({"exact": "issuer"}, {"exact": "alice"}),
    ),
    (
        "requestPrincipals prefix",
        src(requestPrincipals=["iss/tenant/*"]),
        ors(
            iss_sub({"prefix": "iss/tenant/"}, ANY_STRING),
            iss_sub({"exact": "iss"}, {"prefix": "tenant/"}),
            iss_sub({"exact": "iss/tenant"}, ANY_STRING),
        ),
    ),
    (
        "requestPrincipals suffix",
        src(requestPrincipals=["*/team/carol"]),
        ors(
            iss_sub(ANY_STRING, {"suffix": "/team/carol"}),
            iss_sub(ANY_STRING, {"exact": "team/carol"}),
            iss_sub({"suffix": "/team"}, {"exact": "carol"}),
        ),
    ),
    ("requestPrincipals present", src(requestPrincipals=["*"]), iss_sub(ANY_STRING, ANY_STRING)),
    # "iss/sub" always holds a '/': an exact value without one never matches.
    ("requestPrincipals no slash", src(requestPrincipals=["alice"]), NEVER_PRINCIPAL),
    (
        "notRequestPrincipals",
        src(notRequestPrincipals=["*"]),
        {"not_id": iss_sub(ANY_STRING, ANY_STRING)},
    ),
    # Namespaces: the engine's <td>/ns/<ns>/sa/<sa>, anchored and escaped (istiod:
    # ".*/ns/<value with * as .*>/.*").
    (
        "namespaces exact",
        src(namespaces=["default"]),
        ors(authenticated(**regex(SPIFFE_ID.format(ns="default", sa="[^/]*")))),
    ),
    (
        "namespaces prefix",
        src(namespaces=["def*"]),
        ors(authenticated(**regex(SPIFFE_ID.format(ns="def[^/]*", sa="[^/]*")))),
    ),
    (
        "namespaces suffix",
        src(namespaces=["*.prod"]),
        ors(authenticated(**regex(SPIFFE_ID.format(ns=r"[^/]*\.prod", sa="[^/]*")))),
    ),
    (
        "namespaces present",
        src(namespaces=["*"]),
        ors(authenticated(**regex(SPIFFE_ID.format(ns="[^/]+", sa="[^/]*")))),
    ),
    ("namespaces with a slash never match", src(namespaces=["a/b"]), ors(NEVER_PRINCIPAL)),
    (
        "notNamespaces",
        src(notNamespaces=["prod"]),
        {"not_id": ors(authenticated(**regex(SPIFFE_ID.format(ns="prod", sa="[^/]*"))))},
    ),
    (
        "serviceAccounts",
        src(serviceAccounts=["default/web"]),
        ors(authenticated(**regex(SPIFFE_ID.format(ns="default", sa="web")))),
    ),
    (
        "trustDomains",
        src(trustDomains=["example.org"]),
        ors(authenticated(**regex(r"spiffe://example\.org/ns/[^/]*/sa/[^/]*"))),
    ),
    (
        "ipBlocks",
        src(ipBlocks=["10.1.2.99/24", "fd00::1"]),
        ors(
            {"direct_remote_ip": {"address_prefix": "10.1.2.0", "prefix_len": 24}},
            {"direct_remote_ip": {"address_prefix": "fd00::1", "prefix_len": 128}},
        ),
    ),
    (
        "notRemoteIpBlocks",
        src(notRemoteIpBlocks=["203.0.113.0/24"]),
        {"not_id": ors({"remote_ip": {"address_prefix": "203.0.113.0", "prefix_len": 24}})},
    ),
    # when keys on the principal side
    (
        "when header (name lowercased)",
        when("request.headers[X-Team]", ["blue", "bl*", "*ue"]),
        ors(
            {"header": {"name": "x-team", "string_match": {"exact": "blue"}}},
            {"header": {"name": "x-team", "string_match": {"prefix": "bl"}}},
            {"header": {"name": "x-team", "string_match": {"suffix": "ue"}}},
        ),
    ),
    # The engine's "present" is non-empty (istiod: present_match, which an empty header meets).
    (
        "when header present",
        when("request.headers[x-team]", ["*"]),
        ors({"header": {"name": "x-team", "string_match": regex(".+")}}),
    ),
    (
        "when header notValues",
        when("request.headers[x-team]", not_values=["blue"]),
        {"not_id": ors({"header": {"name": "x-team", "string_match": {"exact": "blue"}}})},
    ),
    (
        "when source.ip",
        when("source.ip", ["10.0.0.0/8"]),
        ors({"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}),
    ),
    (
        "when remote.ip",
        when("remote.ip", ["10.0.0.1"]),
        ors({"remote_ip": {"address_prefix": "10.0.0.1", "prefix_len": 32}}),
    ),
    (
        "when source.principal",
        when("source.principal", ["example.org/ns/a/sa/b"]),
        ors(authenticated(exact="spiffe://example.org/ns/a/sa/b")),
    ),
    (
        "when source.namespace",
        when("source.namespace", ["prod"]),
        ors(authenticated(**regex(SPIFFE_ID.format(ns="prod", sa="[^/]*")))),
    ),
    (
        "when request.auth.principal",
        when("request.auth.principal", ["iss/sub"]),
        iss_sub({"exact": "iss"}, {"exact": "sub"}),
    ),
    # Claims: a string, or a list holding a matching string (istiod's extended JWT matcher).
    (
        "when audiences",
        when("request.auth.audiences", ["api", "*"]),
        claim(["aud"], {"exact": "api"}, regex("(?s).+")),
    ),
    ("when presenter", when("request.auth.presenter", ["cli"]), claim(["azp"], {"exact": "cli"})),
    (
        "when nested claim",
        when("request.auth.claims[org][team]", ["pay*"]),
        claim(["org", "team"], {"prefix": "pay"}),
    ),
    (
        "when claim notValues",
        when("request.auth.claims[groups]", not_values=["ops"]),
        {"not_id": claim(["groups"], {"exact": "ops"})},
    ),
]


@pytest.mark.parametrize(
    ("rule", "expected"), [pytest.param(r, e, id=n) for n, r, e in PRINCIPAL_CASES]
)
def test_principal_side(rule: dict[str, Any], expected: dict[str, Any]) -> None:
    built = only_policy(rbac(policy(rules=[rule])))
    assert built["permissions"] == [{"and_rules": {"rules": [{"any": True}]}}]
    assert built["principals"] == [{"and_ids": {"ids": [expected]}}]


PERMISSION_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # Hosts: :authority ignoring case (ASCII, as the engine), plus the host with a port
    # when the value has none (the engine also matches "api.example.com:8080").
    (
        "hosts exact",
        op(hosts=["API.example.com"]),
        or_rules(
            authority(exact="api.example.com", ignore_case=True),
            host_with_port(authority(prefix="api.example.com:", ignore_case=True), "[^:]*:[0-9]+"),
        ),
    ),
    (
        "hosts suffix",
        op(hosts=["*.example.com"]),
        or_rules(
            authority(suffix=".example.com", ignore_case=True),
            host_with_port(authority(contains=".example.com:", ignore_case=True), "[^:]*:[0-9]+"),
        ),
    ),
    ("hosts prefix", op(hosts=["api.*"]), or_rules(authority(prefix="api.", ignore_case=True))),
    ("hosts present", op(hosts=["*"]), or_rules(authority(**regex(".+")))),
    (
        "hosts IPv6",
        op(hosts=["[::1]"]),
        or_rules(
            authority(exact="[::1]", ignore_case=True),
            host_with_port(authority(prefix="[::1]:", ignore_case=True), r"[^\]]*\]:[0-9]+"),
        ),
    ),
    (
        "hosts with a port",
        op(hosts=["a.com:8080"]),
        or_rules(authority(exact="a.com:8080", ignore_case=True)),
    ),
    (
        "notHosts",
        op(notHosts=["a.*"]),
        {"not_rule": or_rules(authority(prefix="a.", ignore_case=True))},
    ),
    (
        "methods",
        op(methods=["GET", "P*", "*T", "*"]),
        or_rules(
            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
            {"header": {"name": ":method", "string_match": {"prefix": "P"}}},
            {"header": {"name": ":method", "string_match": {"suffix": "T"}}},
            {"header": {"name": ":method", "present_match": True}},
        ),
    ),
    (
        "notMethods",
        op(notMethods=["DELETE"]),
        {
            "not_rule": or_rules(
                {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}
            )
        },
    ),
    (
        "paths",
        op(paths=["/exact", "/prefix/*", "*/suffix", "*"]),
        or_rules(
            {"url_path": {"path": {"exact": "/exact"}}},
            {"url_path": {"path": {"prefix": "/prefix/"}}},
            {"url_path": {"path": {"suffix": "/suffix"}}},
            {"url_path": {"path": regex(".+")}},
        ),
    ),
    (
        "paths templates",
        op(paths=["/v1/{*}/items/{**}", "/a/{*}/"]),
        or_rules(
            {
                "uri_template": {
                    "name": "uri-template",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                        "path_template": "/v1/*/items/**",
                    },
                }
            },
            {
                "uri_template": {
                    "name": "uri-template",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
                        "path_template": "/a/*/",
                    },
                }
            },
        ),
    ),
    (
        "notPaths",
        op(notPaths=["/admin/*"]),
        {"not_rule": or_rules({"url_path": {"path": {"prefix": "/admin/"}}})},
    ),
    (
        "ports",
        op(ports=["8080", "9090"]),
        or_rules({"destination_port": 8080}, {"destination_port": 9090}),
    ),
    ("notPorts", op(notPorts=["22"]), {"not_rule": or_rules({"destination_port": 22})}),
    (
        "when destination.ip",
        when("destination.ip", ["10.9.0.0/16"]),
        or_rules({"destination_ip": {"address_prefix": "10.9.0.0", "prefix_len": 16}}),
    ),
    (
        "when destination.port",
        when("destination.port", ["91"]),
        or_rules({"destination_port": 91}),
    ),
    (
        "when connection.sni",
        when("connection.sni", ["*.example.com", "*"]),
        or_rules(
            {"requested_server_name": {"suffix": ".example.com"}},
            {"requested_server_name": regex(".+")},
        ),
    ),
    (
        "when filter metadata",
        when("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[insert]", "ins*"]),
        or_rules(
            {
                "sourced_metadata": {
                    "metadata_matcher": {
                        "filter": "envoy.filters.network.mysql_proxy",
                        "path": [{"key": "db.table"}],
                        "value": {"list_match": {"one_of": {"string_match": {"exact": "insert"}}}},
                    }
                }
            },
            {
                "sourced_metadata": {
                    "metadata_matcher": {
                        "filter": "envoy.filters.network.mysql_proxy",
                        "path": [{"key": "db.table"}],
                        "value": {"string_match": {"prefix": "ins"}},
                    }
                }
            },
        ),
    ),
]


@pytest.mark.parametrize(
    ("rule", "expected"), [pytest.param(r, e, id=n) for n, r, e in PERMISSION_CASES]
)
def test_permission_side(rule: dict[str, Any], expected: dict[str, Any]) -> None:
    built = only_policy(rbac(policy(rules=[rule])))
    assert built["principals"] == [{"and_ids": {"ids": [{"any": True}]}}]
    assert built["permissions"] == [{"and_rules": {"rules": [expected]}}]


def test_principals_of_the_trust_domain_and_its_aliases() -> None:
    # Istio rewrites a principal naming the trust domain (or an alias) for each of them.
    built = only_policy(
        rbac(policy(rules=[src(principals=["old.org/ns/a/sa/b"])]), aliases=("old.org",))
    )
    assert built["principals"][0]["and_ids"]["ids"] == [
        ors(
            authenticated(exact="spiffe://example.org/ns/a/sa/b"),
            authenticated(exact="spiffe://old.org/ns/a/sa/b"),
        )
    ]


def test_rule_structure_sources_operations_and_conditions() -> None:
    # Sources ORed (one principal each), operations ORed (one permission each), fields
    # ANDed in istiod's order, every when condition ANDed into each of them.
    rule = {
        "from": [
            {"source": {"ipBlocks": ["10.0.0.1"], "principals": ["a/ns/b/sa/c"]}},
            {"source": {"namespaces": ["x"]}},
        ],
        "to": [{"operation": {"ports": ["80"], "methods": ["GET"]}}],
        "when": [
            {"key": "destination.port", "values": ["80"]},
            {"key": "request.headers[x]", "values": ["y"]},
        ],
    }
    built = only_policy(rbac(policy(rules=[rule])))
    header = ors({"header": {"name": "x", "string_match": {"exact": "y"}}})
    assert built["principals"] == [
        {
            "and_ids": {
                "ids": [
                    ors(authenticated(exact="spiffe://a/ns/b/sa/c")),
                    ors({"direct_remote_ip": {"address_prefix": "10.0.0.1", "prefix_len": 32}}),
                    header,
                ]
            }
        },
        {
            "and_ids": {
                "ids": [ors(authenticated(**regex(SPIFFE_ID.format(ns="x", sa="[^/]*")))), header]
            }
        },
    ]
    assert built["permissions"] == [
        {
            "and_rules": {
                "rules": [
                    or_rules({"header": {"name": ":method", "string_match": {"exact": "GET"}}}),
                    or_rules({"destination_port": 80}),
                    or_rules({"destination_port": 80}),
                ]
            }
        }
    ]


# --- the chain: slots, actions, dry-run, names ------------------------------------------

GET = [op(methods=["GET"])]
ANY_POLICY = {
    "permissions": [{"and_rules": {"rules": [{"any": True}]}}],
    "principals": [{"and_ids": {"ids": [{"any": True}]}}],
}
NEVER_POLICY = {
    "permissions": [{"not_rule": {"any": True}}],
    "principals": [{"not_id": {"any": True}}],
}
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


def test_no_policies_four_pass_through_filters_in_istio_order() -> None:
    result = rbac()
    assert [f.name for f in result.http] == [
        "meshward.rbac.http.custom",
        "meshward.rbac.http.audit",
        "meshward.rbac.http.deny",
        "meshward.rbac.http.allow",
    ]
    # No rules at all: Envoy lets every request through (the chain never changes shape).
    assert all(f.typed_config == {"@type": RBAC_TYPE} for f in result.http)
    assert result.tcp == ()
    assert result.policies == ()


def test_each_action_fills_its_slot() -> None:
    result = rbac(
        policy("a", rules=[{}]),
        policy("d", action="DENY", rules=[{}]),
        policy("au", action="AUDIT", rules=[{}]),
        policy("c", action="CUSTOM", rules=[{}]),
    )
    assert slot(result, "allow").typed_config == {
        "@type": RBAC_TYPE,
        "rules": {"action": "ALLOW", "policies": {"ns[default]-policy[a]-rule[0]": ANY_POLICY}},
        "rules_stat_prefix": "meshward_allow_",
    }
    assert slot(result, "deny").typed_config == {
        "@type": RBAC_TYPE,
        "rules": {"action": "DENY", "policies": {"ns[default]-policy[d]-rule[0]": ANY_POLICY}},
        "rules_stat_prefix": "meshward_deny_",
    }
    assert slot(result, "audit").typed_config == {
        "@type": RBAC_TYPE,
        "rules": {"action": "LOG", "policies": {"ns[default]-policy[au]-rule[0]": ANY_POLICY}},
        "rules_stat_prefix": "meshward_audit_",
    }
    # CUSTOM: shadow rules only, whose match turns ext_authz on (istiod's mechanism).
    assert slot(result, "custom").typed_config == {
        "@type": RBAC_TYPE,
        "shadow_rules": {
            "action": "DENY",
            "policies": {"istio-ext-authz-ns[default]-policy[c]-rule[0]": ANY_POLICY},
        },
        "shadow_rules_stat_prefix": "istio_ext_authz_",
    }
    assert ext_authz_enabled_metadata(Family.HTTP) == {
        "filter": "envoy.filters.http.rbac",
        "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
        "value": {"string_match": {"prefix": "istio-ext-authz"}},
    }
    assert ext_authz_enabled_metadata(Family.TCP)["filter"] == "envoy.filters.network.rbac"


def test_policies_without_rules_never_match_but_still_count() -> None:
    # An ALLOW without rules denies everything else (the filter has rules); a DENY
    # without rules denies nothing.
    result = rbac(policy("a"), policy("d", action="DENY"))
    assert slot(result, "allow").typed_config["rules"] == {
        "action": "ALLOW",
        "policies": {"ns[default]-policy[a]-rule[0]": NEVER_POLICY},
    }
    assert slot(result, "deny").typed_config["rules"]["policies"] == {
        "ns[default]-policy[d]-rule[0]": NEVER_POLICY
    }


def test_dry_run_policies_are_shadow_rules_with_istios_prefixes() -> None:
    result = rbac(
        policy("a", rules=GET),
        policy("sa", rules=GET, dry_run=True),
        policy("sd", action="DENY", rules=[{}, *GET], dry_run=True),
        policy("sau", action="AUDIT", rules=[{}], dry_run=True),
    )
    allow = slot(result, "allow").typed_config
    assert allow["rules"]["policies"].keys() == {"ns[default]-policy[a]-rule[0]"}
    assert allow["shadow_rules"]["action"] == "ALLOW"
    assert allow["shadow_rules"]["policies"].keys() == {"ns[default]-policy[sa]-rule[0]"}
    assert allow["shadow_rules_stat_prefix"] == "istio_dry_run_allow_"
    deny = slot(result, "deny").typed_config
    assert "rules" not in deny  # only dry-run DENY policies: nothing is enforced
    assert deny["shadow_rules"]["policies"].keys() == {
        "ns[default]-policy[sd]-rule[0]",
        "ns[default]-policy[sd]-rule[1]",
    }
    assert deny["shadow_rules_stat_prefix"] == "istio_dry_run_deny_"
    # The engine neither enforces nor records a dry-run AUDIT policy.
    assert slot(result, "audit").typed_config == {"@type": RBAC_TYPE}


SCOPE_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("namespace-wide", policy(rules=GET), True),
    ("root namespace", policy(namespace="istio-system", rules=GET), True),
    ("other namespace", policy(namespace="prod", rules=GET), False),
    ("selector matches", policy(rules=GET, selector={"matchLabels": {"app": "api"}}), True),
    ("selector misses", policy(rules=GET, selector={"matchLabels": {"app": "db"}}), False),
    (
        "root selector",
        policy(namespace="istio-system", rules=GET, selector={"matchLabels": {"version": "v1"}}),
        True,
    ),
    (
        "targetRefs matches",
        policy(rules=GET, targetRefs=[{"kind": "Service", "name": "api"}]),
        True,
    ),
    ("targetRefs misses", policy(rules=GET, targetRefs=[{"kind": "Service", "name": "db"}]), False),
    (
        "root targetRefs: root-namespace Services only",
        policy(
            namespace="istio-system", rules=GET, targetRefs=[{"kind": "Service", "name": "api"}]
        ),
        False,
    ),
]


@pytest.mark.parametrize(("doc", "applies"), [pytest.param(d, a, id=n) for n, d, a in SCOPE_CASES])
def test_scope_decides_which_policies_a_workload_gets(doc: dict[str, Any], applies: bool) -> None:
    result = rbac(doc)
    policies = slot(result, "allow").typed_config.get("rules", {}).get("policies", {})
    assert bool(policies) is applies
    assert bool(result.policies) is applies


def test_policy_names_sort_as_envoy_tries_them() -> None:
    result = rbac(
        policy("a", action="DENY", rules=GET * 11),
        policy("a-b", action="DENY", rules=GET),
        policy("r", namespace="istio-system", action="DENY", rules=GET),
    )
    names = sorted(slot(result, "deny").typed_config["rules"]["policies"])
    # Byte order: "-" < "1" < "]", so a-b first, rule[10] before rule[1]'s successor rule[2].
    assert names[:4] == [
        "ns[default]-policy[a-b]-rule[0]",
        "ns[default]-policy[a]-rule[0]",
        "ns[default]-policy[a]-rule[10]",
        "ns[default]-policy[a]-rule[1]",
    ]
    assert names[-1] == "ns[istio-system]-policy[r]-rule[0]"
    assert result.policies == ("default.a-b", "default.a", "istio-system.r")


@pytest.mark.parametrize(
    ("name", "rule_id"),
    [
        ("ns[default]-policy[a-b]-rule[0]", "default.a-b[rules[0]]"),
        ("istio-ext-authz-ns[prod]-policy[x.y]-rule[12]", "prod.x.y[rules[12]]"),
        ("none", None),
        ("ns[default]-policy[a]-rule[x]", None),
        ("ns[]-policy[a]-rule[0]", None),
    ],
)
def test_parse_policy_name(name: str, rule_id: str | None) -> None:
    assert parse_policy_name(name) == rule_id


# --- TCP ports -----------------------------------------------------------------------------

TCP_WORKLOAD = Workload("default", {"app": "api"}, "api", tcp_ports=(5432,))
NETWORK_TYPE = "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"


def test_tcp_ports_get_network_filters_without_http_only_fields() -> None:
    result = rbac(
        policy(
            "a",
            rules=[
                op(ports=["5432"], methods=["GET"]),  # needs HTTP: left out of ALLOW
                op(ports=["5432"]),
            ],
        ),
        policy("d", action="DENY", rules=[op(ports=["22"], paths=["/admin"])]),
        workload=TCP_WORKLOAD,
    )
    assert [f.name for f in result.tcp] == [
        "meshward.rbac.tcp.custom",
        "meshward.rbac.tcp.audit",
        "meshward.rbac.tcp.deny",
        "meshward.rbac.tcp.allow",
    ]
    allow = slot(result, "allow", Family.TCP).typed_config
    assert allow["@type"] == NETWORK_TYPE
    assert allow["stat_prefix"] == "tcp."
    assert "rules_stat_prefix" not in allow  # the network filter has no such field
    assert allow["rules"]["policies"] == {
        "ns[default]-policy[a]-rule[1]": {
            "permissions": [{"and_rules": {"rules": [or_rules({"destination_port": 5432})]}}],
            "principals": [{"and_ids": {"ids": [{"any": True}]}}],
        }
    }
    # DENY keeps the rule and drops only the HTTP field: a wider deny, never a narrower one.
    deny = slot(result, "deny", Family.TCP).typed_config
    assert deny["rules"]["policies"]["ns[default]-policy[d]-rule[0]"]["permissions"] == [
        {"and_rules": {"rules": [or_rules({"destination_port": 22})]}}
    ]


def test_tcp_allow_with_only_http_rules_denies_every_connection() -> None:
    result = rbac(policy("a", rules=GET), workload=TCP_WORKLOAD)
    assert slot(result, "allow", Family.TCP).typed_config["rules"] == {
        "action": "ALLOW",
        "policies": {},
    }


# --- digests ----------------------------------------------------------------------------------


def test_digests_are_stable_and_follow_content() -> None:
    docs = [policy("a", rules=GET), policy("d", action="DENY", rules=[op(paths=["/x"])])]
    first, again = rbac(*docs), rbac(*docs)
    assert [f.digest for f in first.http] == [f.digest for f in again.http]
    assert first.digest == again.digest
    changed = rbac(docs[0], policy("d", action="DENY", rules=[op(paths=["/y"])]))
    digests = {f.name: f.digest for f in first.http}
    moved = [f.name for f in changed.http if f.digest != digests[f.name]]
    assert moved == ["meshward.rbac.http.deny"]  # only that filter needs a new version
    assert changed.digest != first.digest


def test_as_config_is_a_fresh_typed_extension_config() -> None:
    deny = slot(rbac(policy("d", action="DENY", rules=[{}])), "deny")
    config = deny.as_config()
    assert config.keys() == {"name", "typed_config"}
    config["typed_config"]["rules"]["action"] = "ALLOW"
    assert deny.typed_config["rules"]["action"] == "DENY"


def test_every_filter_parses_into_the_real_protos() -> None:
    rule = {
        "from": [
            {
                "source": {
                    "principals": ["*", "a/*", "*/b"],
                    "requestPrincipals": ["i/s", "i*", "*s"],
                    "namespaces": ["n*"],
                    "ipBlocks": ["10.0.0.0/8"],
                    "notRemoteIpBlocks": ["fd00::/8"],
                }
            }
        ],
        "to": [
            {
                "operation": {
                    "hosts": ["a.com", "*.b"],
                    "methods": ["*"],
                    "paths": ["/a/{**}", "*"],
                    "notPorts": ["1"],
                }
            }
        ],
        "when": [
            {"key": "request.auth.claims[a][b]", "values": ["c"]},
            {"key": "experimental.envoy.filters.x[y]", "notValues": ["[z]"]},
            {"key": "connection.sni", "values": ["*"]},
        ],
    }
    docs = [
        policy(f"p-{action.lower()}", action=action, rules=[rule])
        for action in ("ALLOW", "DENY", "AUDIT", "CUSTOM")
    ]
    docs.append(policy("dry", action="DENY", rules=[rule], dry_run=True))
    result = rbac(*docs, workload=TCP_WORKLOAD)
    for f in result.filters():
        message = http_rbac_pb2.RBAC() if f.family is Family.HTTP else network_rbac_pb2.RBAC()
        config = f.typed_config
        del config["@type"]
        json_format.ParseDict(config, message)  # raises on any field the proto lacks
        # Every slot holds a policy here (the TCP ALLOW one an empty, deny-all set).
        assert message.HasField("rules") or message.HasField("shadow_rules"), f.name


# --- refused: what Envoy cannot match as the engine does -------------------------------------


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "principal suffix beyond RE2's program size",
        src(principals=["*" + "/x" * 45]),
        "spec.rules[0].from[0].source.principals",
        "program-size limit",
    ),
    (
        "namespace beyond RE2's program size",
        src(namespaces=["n" * 80]),
        "spec.rules[0].from[0].source.namespaces",
        "shorten the value",
    ),
    (
        "template with an empty segment",
        op(paths=["/a//{*}"]),
        "spec.rules[0].to[0].operation.paths",
        "uri_template",
    ),
    (
        "template with a space",
        op(paths=["/a b/{*}"]),
        "spec.rules[0].to[0].operation.paths",
        "percent-encode",
    ),
    (
        "header name Envoy refuses",
        when("request.headers[x y]", ["v"]),
        "spec.rules[0].when[0].values",
        "not an HTTP header name",
    ),
]


@pytest.mark.parametrize(
    ("rule", "field", "message"), [pytest.param(r, f, m, id=n) for n, r, f, m in REFUSED]
)
def test_what_envoy_cannot_match_exactly_is_a_load_error(
    rule: dict[str, Any], field: str, message: str
) -> None:
    docs = [policy("ok", rules=GET), policy("bad", action="DENY", rules=[rule])]
    with pytest.raises(PolicyLoadError) as info:
        rbac(*docs)
    (issue,) = info.value.issues
    assert (issue.file, issue.document, issue.field) == ("policies.yaml", 1, field)
    assert message in issue.message
    assert "cannot be enforced by Envoy's RBAC filter" in issue.message
    assert translation_issues(load(*docs)) == [issue]


def test_a_refused_policy_only_blocks_the_workloads_it_applies_to() -> None:
    bad = policy("bad", namespace="prod", rules=[op(paths=["/a//{*}"])])
    result = rbac(policy("ok", rules=GET), bad)
    assert result.policies == ("default.ok",)
    (issue,) = translation_issues(load(bad))
    assert (issue.document, issue.field) == (0, "spec.rules[0].to[0].operation.paths")


def test_longest_principal_suffix_accepted_fits_envoys_limit() -> None:
    # The bound is conservative: Envoy accepts the longest values it lets through
    # (tests/e2e/test_rbac_differential.py validates them); one byte more is refused.
    longest = "*" + "x" * 80
    rbac(policy(rules=[src(principals=[longest])]))
    with pytest.raises(PolicyLoadError):
        rbac(policy(rules=[src(principals=[longest + "x"])]))


def test_runtime_the_filters_need() -> None:
    # Repeated headers: the engine sees them joined with ",", as ext_authz sends them.
    assert ENVOY_RUNTIME == {"envoy.reloadable_features.rbac_match_headers_individually": False}
