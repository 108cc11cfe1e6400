"""Loading AuthorizationPolicy YAML: what compiles, and every validation error with its location."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from authz.errors import PolicyIssue, PolicyLoadError
from authz.istio_loader import load_policies
from authz.istio_policy import Action, CompiledPolicy

HEAD = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: web\n"


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(root: Path) -> list[CompiledPolicy]:
    return list(load_policies(root, trust_domain="example.org").policies)


def issues_of(root: Path) -> list[PolicyIssue]:
    with pytest.raises(PolicyLoadError) as info:
        load_policies(root, trust_domain="example.org")
    return info.value.issues


def spec_doc(spec: dict[str, Any], **meta: Any) -> str:
    metadata = {"name": "p", "namespace": "web", **meta}
    return yaml.safe_dump(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": metadata,
            "spec": spec,
        }
    )


def rule(**parts: Any) -> dict[str, Any]:
    return {"rules": [parts]}


def source(**fields: Any) -> dict[str, Any]:
    return rule(**{"from": [{"source": fields}]})


def operation(**fields: Any) -> dict[str, Any]:
    return rule(to=[{"operation": fields}])


def condition(**cond: Any) -> dict[str, Any]:
    return rule(when=[cond])


def test_loads_recursively_multi_document_both_versions(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        HEAD + "spec:\n  action: DENY\n  rules: [{}]\n---\n" + HEAD.replace("name: p", "name: q"),
    )
    write(
        tmp_path,
        "deep/er/b.yml",
        HEAD.replace("v1\n", "v1beta1\n").replace("namespace: web", "namespace: other"),
    )
    write(tmp_path, "deep/notes.txt", "not: policy")
    write(tmp_path, ".hidden/c.yaml", "garbage: [")
    write(tmp_path, "empty.yaml", "---\n---\n")
    got = {(p.namespace, p.name): p for p in load(tmp_path)}
    assert sorted(got) == [("other", "p"), ("web", "p"), ("web", "q")]
    assert got["web", "p"].action is Action.DENY
    assert len(got["web", "p"].rules) == 1
    assert got["web", "q"].action is Action.ALLOW
    assert got["web", "q"].rules == ()
    assert got["web", "p"].file == str(tmp_path / "a.yaml")


def test_namespace_defaults_to_default_and_dry_run_is_read(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n"
        '  annotations:\n    istio.io/dry-run: "true"\nspec:\n  action: DENY\n',
    )
    (p,) = load(tmp_path)
    assert (p.namespace, p.dry_run) == ("default", True)


def test_custom_rego_provider_loads(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        spec_doc({"action": "CUSTOM", "provider": {"name": "rego"}, "rules": [{}]}),
    )
    (p,) = load(tmp_path)
    assert (p.action, p.provider) == (Action.CUSTOM, "rego")


def test_valid_templates_and_fields_load(tmp_path: Path) -> None:
    write(
        tmp_path,
        "a.yaml",
        spec_doc(
            operation(
                paths=["/a/{*}", "/a/{**}", "/a/{*}/b/{**}", "/{**}/", "/x*", "*", "/a*b"],
                ports=["1", "65535"],
                hosts=["*.x"],
            )
        ),
    )
    assert len(load(tmp_path)) == 1


# (name, document text, field path, message fragment)
ERROR_CASES: list[tuple[str, str, str, str]] = [
    (
        "apiVersion",
        HEAD.replace("security.istio.io/v1", "networking.istio.io/v1"),
        "apiVersion",
        "use security.istio.io/v1",
    ),
    (
        "kind",
        HEAD.replace("AuthorizationPolicy", "PeerAuthentication"),
        "kind",
        "only AuthorizationPolicy",
    ),
    (
        "top-level unknown",
        HEAD + "status: {}\n",
        "status",
        "unknown field; expected one of: apiVersion, kind, metadata, spec",
    ),
    ("not a mapping", "- a\n- b\n", "(document)", "must be a mapping, not a list"),
    ("metadata unknown", HEAD + "  nmespace: x\n", "metadata.nmespace", "unknown field"),
    (
        "missing name",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {namespace: a}\n",
        "metadata.name",
        "is required",
    ),
    ("bad name", HEAD.replace("name: p", "name: My_Policy"), "metadata.name", "DNS subdomain"),
    (
        "bad namespace",
        HEAD.replace("namespace: web", "namespace: Web.x"),
        "metadata.namespace",
        "must be a namespace name",
    ),
    (
        "annotations not mapping",
        HEAD + "  annotations: [a]\n",
        "metadata.annotations",
        "must be a mapping",
    ),
    (
        "dry-run value",
        spec_doc({}, annotations={"istio.io/dry-run": "yes"}),
        "metadata.annotations[istio.io/dry-run]",
        'must be the string "true" or "false"',
    ),
    (
        "dry-run unquoted bool",
        HEAD + "  annotations:\n    istio.io/dry-run: true\n",
        "metadata.annotations[istio.io/dry-run]",
        "quote it",
    ),
    (
        "dry-run on CUSTOM",
        spec_doc(
            {"action": "CUSTOM", "provider": {"name": "rego"}},
            annotations={"istio.io/dry-run": "true"},
        ),
        "metadata.annotations[istio.io/dry-run]",
        "not supported for CUSTOM",
    ),
    (
        "spec unknown",
        spec_doc({"rule": []}),
        "spec.rule",
        "unknown field; expected one of: selector, targetRef, targetRefs, action, provider, rules",
    ),
    (
        "action",
        spec_doc({"action": "REJECT"}),
        "spec.action",
        "'REJECT' is not one of ALLOW, DENY, AUDIT, CUSTOM",
    ),
    ("action lowercase", spec_doc({"action": "deny"}), "spec.action", "is not one of"),
    (
        "CUSTOM needs provider",
        spec_doc({"action": "CUSTOM"}),
        "spec.provider",
        "is required for action CUSTOM",
    ),
    (
        "unknown provider",
        spec_doc({"action": "CUSTOM", "provider": {"name": "oauth2-proxy"}}),
        "spec.provider.name",
        "unknown provider 'oauth2-proxy'; the only provider is 'rego'",
    ),
    (
        "provider without CUSTOM",
        spec_doc({"action": "DENY", "provider": {"name": "rego"}}),
        "spec.provider",
        "only allowed with action CUSTOM",
    ),
    (
        "provider unknown field",
        spec_doc({"action": "CUSTOM", "provider": {"name": "rego", "x": 1}}),
        "spec.provider.x",
        "unknown field",
    ),
    (
        "selector and targetRefs",
        spec_doc(
            {
                "selector": {"matchLabels": {"a": "b"}},
                "targetRefs": [{"kind": "Service", "name": "s"}],
            }
        ),
        "spec",
        "at most one of selector and targetRefs",
    ),
    (
        "selector unknown",
        spec_doc({"selector": {"matchExpressions": []}}),
        "spec.selector.matchExpressions",
        "unknown field",
    ),
    (
        "label not string",
        spec_doc({"selector": {"matchLabels": {"version": 1}}}),
        "spec.selector.matchLabels[version]",
        "label values must be strings",
    ),
    (
        "targetRefs kind",
        spec_doc({"targetRefs": [{"kind": "Gateway", "name": "g"}]}),
        "spec.targetRefs[0].kind",
        "'Gateway' is not supported; use Service",
    ),
    (
        "targetRefs group",
        spec_doc({"targetRefs": [{"kind": "Service", "group": "apps", "name": "s"}]}),
        "spec.targetRefs[0].group",
        'must be "" (the core group)',
    ),
    (
        "targetRef and targetRefs",
        spec_doc(
            {
                "targetRef": {"kind": "Service", "name": "s"},
                "targetRefs": [{"kind": "Service", "name": "s"}],
            }
        ),
        "spec",
        "not both",
    ),
    (
        "targetRefs kind missing",
        spec_doc({"targetRefs": [{"name": "s"}]}),
        "spec.targetRefs[0].kind",
        "is required: Service",
    ),
    (
        "targetRefs name",
        spec_doc({"targetRefs": [{"kind": "Service"}]}),
        "spec.targetRefs[0].name",
        "is required",
    ),
    (
        "targetRefs namespace",
        spec_doc({"targetRefs": [{"kind": "Service", "name": "s", "namespace": "other"}]}),
        "spec.targetRefs[0].namespace",
        "must be the policy's namespace 'web'",
    ),
    (
        "targetRefs unknown",
        spec_doc({"targetRefs": [{"kind": "Service", "name": "s", "port": 80}]}),
        "spec.targetRefs[0].port",
        "unknown field",
    ),
    (
        "rules not list",
        spec_doc({"rules": {"from": []}}),
        "spec.rules",
        "must be a list, not a mapping",
    ),
    (
        "rule unknown",
        spec_doc({"rules": [{"form": []}]}),
        "spec.rules[0].form",
        "unknown field; expected one of: from, to, when",
    ),
    (
        "from entry unknown",
        spec_doc(rule(**{"from": [{"source": {"namespaces": ["a"]}, "sources": {}}]})),
        "spec.rules[0].from[0].sources",
        "unknown field",
    ),
    (
        "empty source",
        spec_doc(rule(**{"from": [{"source": {}}]})),
        "spec.rules[0].from[0].source",
        "must not be empty",
    ),
    (
        "empty operation",
        spec_doc(rule(to=[{"operation": None}])),
        "spec.rules[0].to[0].operation",
        "must not be empty",
    ),
    (
        "source unknown",
        spec_doc(source(principal=["a"])),
        "spec.rules[0].from[0].source.principal",
        "unknown field",
    ),
    (
        "operation unknown",
        spec_doc(operation(path=["/a"])),
        "spec.rules[0].to[0].operation.path",
        "unknown field",
    ),
    # Istio rejects these; read literally they would constrain nothing (allow anyone).
    (
        "source of empty lists",
        spec_doc(source(principals=[], notNamespaces=[])),
        "spec.rules[0].from[0].source",
        "has only empty lists; list at least one value (Istio rejects an empty source)",
    ),
    (
        "operation of empty lists",
        spec_doc(operation(methods=[])),
        "spec.rules[0].to[0].operation",
        "has only empty lists; list at least one value (Istio rejects an empty operation)",
    ),
    (
        "empty from",
        spec_doc(rule(**{"from": []})),
        "spec.rules[0].from",
        "must not be empty; remove it or list entries",
    ),
    (
        "empty to",
        spec_doc(rule(to=[])),
        "spec.rules[0].to",
        "must not be empty; remove it or list entries",
    ),
    (
        "condition with empty values and notValues",
        spec_doc(condition(key="source.ip", values=[], notValues=[])),
        "spec.rules[0].when[0]",
        "set at least one of values or notValues for 'source.ip'",
    ),
    (
        "values not list",
        spec_doc(operation(methods="GET")),
        "spec.rules[0].to[0].operation.methods",
        "must be a list, not a string",
    ),
    (
        "empty value",
        spec_doc(operation(methods=["GET", ""])),
        "spec.rules[0].to[0].operation.methods[1]",
        "empty value not allowed",
    ),
    (
        "non-string value",
        spec_doc(operation(ports=[80])),
        "spec.rules[0].to[0].operation.ports[0]",
        "must be a string, not a int; quote it",
    ),
    (
        "ipBlocks CIDR",
        spec_doc(source(ipBlocks=["10.0.0.0/33"])),
        "spec.rules[0].from[0].source.ipBlocks[0]",
        "is not an IP address or CIDR range",
    ),
    (
        "notIpBlocks CIDR",
        spec_doc(source(notIpBlocks=["10.0.0.*"])),
        "spec.rules[0].from[0].source.notIpBlocks[0]",
        "is not an IP address or CIDR range",
    ),
    (
        "remoteIpBlocks CIDR",
        spec_doc(source(remoteIpBlocks=["1.2.3.4", "fd00::/129"])),
        "spec.rules[0].from[0].source.remoteIpBlocks[1]",
        "is not an IP address or CIDR range",
    ),
    (
        "when source.ip",
        spec_doc(condition(key="source.ip", values=["300.1.1.1"])),
        "spec.rules[0].when[0].values[0]",
        "is not an IP address",
    ),
    (
        "when remote.ip",
        spec_doc(condition(key="remote.ip", notValues=["x"])),
        "spec.rules[0].when[0].notValues[0]",
        "is not an IP address",
    ),
    (
        "when destination.ip",
        spec_doc(condition(key="destination.ip", values=["*"])),
        "spec.rules[0].when[0].values[0]",
        "is not an IP address",
    ),
    (
        "port zero",
        spec_doc(operation(ports=["0"])),
        "spec.rules[0].to[0].operation.ports[0]",
        "from 1 to 65535",
    ),
    (
        "port too big",
        spec_doc(operation(notPorts=["65536"])),
        "spec.rules[0].to[0].operation.notPorts[0]",
        "from 1 to 65535",
    ),
    (
        "port name",
        spec_doc(operation(ports=["http"])),
        "spec.rules[0].to[0].operation.ports[0]",
        "is not a port",
    ),
    (
        "when destination.port",
        spec_doc(condition(key="destination.port", values=["8*"])),
        "spec.rules[0].when[0].values[0]",
        "is not a port",
    ),
    (
        "template {**} not last",
        spec_doc(operation(paths=["/a", "/{**}/b/{*}"])),
        "spec.rules[0].to[0].operation.paths[1]",
        "{**} must be the last operator",
    ),
    (
        "template star outside operator",
        spec_doc(operation(paths=["/*/b/{*}"])),
        "spec.rules[0].to[0].operation.paths[0]",
        "'*', '{' and '}' may not appear outside a template operator",
    ),
    (
        "template double star outside",
        spec_doc(operation(paths=["/**/b/{*}"])),
        "spec.rules[0].to[0].operation.paths[0]",
        "may not appear outside a template operator",
    ),
    (
        "template mixed segment",
        spec_doc(operation(paths=["/a/{*}.txt"])),
        "spec.rules[0].to[0].operation.paths[0]",
        "must contain only the operator",
    ),
    (
        "template leading slash",
        spec_doc(operation(notPaths=["a/{*}"])),
        "spec.rules[0].to[0].operation.notPaths[0]",
        "must start with '/'",
    ),
    (
        "named template",
        spec_doc(operation(paths=["/users/{id}"])),
        "spec.rules[0].to[0].operation.paths[0]",
        "only the template operators {*} and {**} are supported",
    ),
    (
        "serviceAccounts form",
        spec_doc(source(serviceAccounts=["default/web/x"])),
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "must be <namespace>/<service account>",
    ),
    (
        "serviceAccounts wildcard",
        spec_doc(source(serviceAccounts=["ns/*"])),
        "spec.rules[0].from[0].source.serviceAccounts[0]",
        "no wildcards",
    ),
    (
        "serviceAccounts with principals",
        spec_doc(source(serviceAccounts=["a/b"], principals=["x"])),
        "spec.rules[0].from[0].source.serviceAccounts",
        "cannot be set together with principals;",
    ),
    (
        "notServiceAccounts with notNamespaces",
        spec_doc(source(notServiceAccounts=["a/b"], notNamespaces=["x"])),
        "spec.rules[0].from[0].source.notServiceAccounts",
        "cannot be set together with notNamespaces;",
    ),
    (
        "serviceAccounts with notPrincipals",
        spec_doc(source(serviceAccounts=["a/b"], notPrincipals=["x"], namespaces=["n"])),
        "spec.rules[0].from[0].source.serviceAccounts",
        "cannot be set together with notPrincipals, namespaces;",
    ),
    (
        "serviceAccounts too many",
        spec_doc(source(serviceAccounts=[f"ns/sa{i}" for i in range(17)])),
        "spec.rules[0].from[0].source.serviceAccounts",
        "has 17 entries; at most 16",
    ),
    (
        "serviceAccounts too long",
        spec_doc(source(notServiceAccounts=["ns/" + "a" * 318])),
        "spec.rules[0].from[0].source.notServiceAccounts[0]",
        "is 321 characters; at most 320",
    ),
    (
        "when serviceAccount form",
        spec_doc(condition(key="source.serviceAccount", values=["a/b/c"])),
        "spec.rules[0].when[0].values[0]",
        "must be <namespace>/<service account>",
    ),
    (
        "when unknown key",
        spec_doc(condition(key="request.method", values=["GET"])),
        "spec.rules[0].when[0].key",
        "unknown key 'request.method'; use one of request.headers[<name>]",
    ),
    (
        "when empty header",
        spec_doc(condition(key="request.headers[]", values=["a"])),
        "spec.rules[0].when[0].key",
        "unknown key",
    ),
    (
        "when bad filter key",
        spec_doc(condition(key="experimental.envoy.filters.x", values=["a"])),
        "spec.rules[0].when[0].key",
        "unknown key",
    ),
    (
        "when missing key",
        spec_doc(condition(values=["a"])),
        "spec.rules[0].when[0].key",
        "is required",
    ),
    (
        "when no values",
        spec_doc(condition(key="source.ip")),
        "spec.rules[0].when[0]",
        "set at least one of values or notValues",
    ),
    (
        "when unknown field",
        spec_doc(condition(key="source.ip", values=["1.2.3.4"], value=["1.2.3.4"])),
        "spec.rules[0].when[0].value",
        "unknown field; expected one of: key, values, notValues",
    ),
]


@pytest.mark.parametrize(
    ("text", "field", "message"), [pytest.param(t, f, m, id=n) for n, t, f, m in ERROR_CASES]
)
def test_validation_error(tmp_path: Path, text: str, field: str, message: str) -> None:
    ok = HEAD.replace("name: p", "name: fine")
    path = write(tmp_path, "policies/x.yaml", ok + "---\n" + text)
    issues = issues_of(tmp_path)
    assert [(i.file, i.document, i.field) for i in issues] == [(str(path), 1, field)]
    assert message in issues[0].message


def test_yaml_syntax_error_names_file_and_document(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", HEAD + "---\n" + HEAD + "spec: {rules: [\n")
    (issue,) = issues_of(tmp_path)
    assert (issue.file, issue.document, issue.field) == (str(path), 1, "")
    assert issue.message.startswith("is not valid YAML")


def test_duplicate_names_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", HEAD.replace("name: p", "name: q") + "---\n" + HEAD)
    b = write(tmp_path, "b.yaml", HEAD)
    (issue,) = issues_of(tmp_path)
    assert (issue.file, issue.document, issue.field) == (str(b), 0, "metadata.name")
    assert "a.yaml (document 1)" in issue.message
    assert "web/p is also defined in" in issue.message
    assert "a.yaml" in issue.message


def test_not_a_directory(tmp_path: Path) -> None:
    (issue,) = issues_of(tmp_path / "missing")
    assert issue.message == "is not a directory of AuthorizationPolicy YAML"


def test_all_errors_are_collected_across_fields_documents_and_files(tmp_path: Path) -> None:
    a = write(
        tmp_path,
        "a.yaml",
        spec_doc(
            {
                "action": "NOPE",
                "rules": [{"to": [{"operation": {"ports": ["0"], "paths": ["/{**}/{*}"]}}]}],
            }
        )
        + "---\n"
        + spec_doc(condition(key="bogus", values=["x"]), name="q"),
    )
    b = write(tmp_path, "sub/b.yml", HEAD.replace("kind: AuthorizationPolicy", "kind: Gateway"))
    issues = issues_of(tmp_path)
    assert [(i.file, i.document, i.field) for i in issues] == [
        (str(a), 0, "spec.action"),
        (str(a), 0, "spec.rules[0].to[0].operation.ports[0]"),
        (str(a), 0, "spec.rules[0].to[0].operation.paths[0]"),
        (str(a), 1, "spec.rules[0].when[0].key"),
        (str(b), 0, "kind"),
    ]
    text = str(PolicyLoadError(issues))
    assert text.startswith("5 problem(s) in the policy directory:")
    assert f"{a}[0]: spec.rules[0].to[0].operation.ports[0]: '0' is not a port" in text


def test_nothing_is_returned_when_any_file_is_bad(tmp_path: Path) -> None:
    write(tmp_path, "good.yaml", HEAD)
    write(tmp_path, "bad.yaml", spec_doc({"action": "deny"}, name="q"))
    with pytest.raises(PolicyLoadError):
        load_policies(tmp_path, trust_domain="example.org")


WRONG_TYPES: list[tuple[str, str, str]] = [
    (
        "apiVersion mapping",
        "apiVersion: {a: 1}\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        "apiVersion",
    ),
    ("kind list", "apiVersion: security.istio.io/v1\nkind: [x]\nmetadata: {name: p}\n", "kind"),
    (
        "metadata missing",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n",
        "metadata",
    ),
    (
        "metadata list",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: [a]\n",
        "metadata",
    ),
    (
        "dry-run list",
        HEAD + "  annotations: {istio.io/dry-run: [x]}\n",
        "metadata.annotations[istio.io/dry-run]",
    ),
    ("spec list", HEAD + "spec: [a]\n", "spec"),
    ("action list", HEAD + "spec: {action: [DENY]}\n", "spec.action"),
    ("provider string", HEAD + "spec: {action: CUSTOM, provider: rego}\n", "spec.provider"),
    ("selector string", HEAD + "spec: {selector: app}\n", "spec.selector"),
    (
        "matchLabels list",
        HEAD + "spec: {selector: {matchLabels: [a]}}\n",
        "spec.selector.matchLabels",
    ),
    ("targetRefs string", HEAD + "spec: {targetRefs: svc}\n", "spec.targetRefs"),
    ("targetRefs item string", HEAD + "spec: {targetRefs: [svc]}\n", "spec.targetRefs[0]"),
    ("rule list", HEAD + "spec: {rules: [[1]]}\n", "spec.rules[0]"),
    ("from string", HEAD + "spec: {rules: [{from: x}]}\n", "spec.rules[0].from"),
    ("from item string", HEAD + "spec: {rules: [{from: [x]}]}\n", "spec.rules[0].from[0]"),
    (
        "source list",
        HEAD + "spec: {rules: [{from: [{source: [a]}]}]}\n",
        "spec.rules[0].from[0].source",
    ),
    ("when item int", HEAD + "spec: {rules: [{when: [1]}]}\n", "spec.rules[0].when[0]"),
    (
        "when key list",
        HEAD + "spec: {rules: [{when: [{key: [a], values: [b]}]}]}\n",
        "spec.rules[0].when[0].key",
    ),
    (
        "values mapping",
        HEAD + "spec: {rules: [{to: [{operation: {paths: {a: b}}}]}]}\n",
        "spec.rules[0].to[0].operation.paths",
    ),
]


@pytest.mark.parametrize(("text", "field"), [pytest.param(t, f, id=n) for n, t, f in WRONG_TYPES])
def test_wrong_types_are_load_errors_not_crashes(tmp_path: Path, text: str, field: str) -> None:
    write(tmp_path, "x.yaml", text)
    issues = issues_of(tmp_path)
    assert [i.field for i in issues] == [field]
    assert issues[0].message
