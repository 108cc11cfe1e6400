"""Engine semantics: action order, scope, empty policies, TCP handling, dry-run, AUDIT, CUSTOM."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import yaml

from authz.istio_engine import IstioDecision, ShadowResult, evaluate
from authz.istio_loader import parse_documents
from authz.istio_policy import Action, PolicySet
from authz.request_view import RequestView

WEB = "example.org/ns/default/sa/web"


def policy(
    name: str,
    *,
    namespace: str = "default",
    action: str | None = None,
    rules: list[Any] | None = None,
    dry_run: bool = False,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = dict(spec)
    if action is not None:
        body["action"] = action
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


def load(*docs: dict[str, Any]) -> PolicySet:
    return parse_documents(yaml.safe_dump_all(docs), trust_domain="example.org")


def request(**kw: Any) -> RequestView:
    base: dict[str, Any] = {
        "workload_namespace": "default",
        "workload_labels": {"app": "api", "version": "v1"},
        "workload_service": "api",
        "source_principal": WEB,
        "source_ip": "10.1.2.3",
        "destination_port": 8080,
        "method": "GET",
        "path": "/data",
        "host": "api",
    }
    base.update(kw)
    return RequestView(**base)


def decide(*docs: dict[str, Any], **kw: Any) -> IstioDecision:
    return evaluate(load(*docs), request(**kw))


GET = [{"to": [{"operation": {"methods": ["GET"]}}]}]
POST = [{"to": [{"operation": {"methods": ["POST"]}}]}]
EVERYTHING: list[Any] = [{}]

# (name, policies, request overrides, allowed, reason, deciding policy id)
ORDER_CASES: list[tuple[str, list[dict[str, Any]], dict[str, Any], bool, str, str | None]] = [
    ("no policies: allowed", [], {}, True, "no_allow_policy", None),
    (
        "ALLOW matches",
        [policy("a", rules=GET)],
        {},
        True,
        "allowed_by_policy",
        "default.a[rules[0]]",
    ),
    (
        "ALLOW no match: denied",
        [policy("a", rules=POST)],
        {},
        False,
        "no_allow_policy_matched",
        None,
    ),
    (
        "DENY matches",
        [policy("d", action="DENY", rules=GET)],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "DENY no match, no ALLOW: allowed",
        [policy("d", action="DENY", rules=POST)],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "DENY beats ALLOW",
        [policy("a", rules=GET), policy("d", action="DENY", rules=GET)],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "DENY miss then ALLOW",
        [policy("a", rules=GET), policy("d", action="DENY", rules=POST)],
        {},
        True,
        "allowed_by_policy",
        "default.a[rules[0]]",
    ),
    (
        "any ALLOW suffices",
        [policy("a1", rules=POST), policy("a2", rules=GET)],
        {},
        True,
        "allowed_by_policy",
        "default.a2[rules[0]]",
    ),
    (
        "second rule index",
        [policy("a", rules=[*POST, *GET])],
        {},
        True,
        "allowed_by_policy",
        "default.a[rules[1]]",
    ),
    (
        "AUDIT alone changes nothing",
        [policy("au", action="AUDIT", rules=EVERYTHING)],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "AUDIT does not count as ALLOW",
        [policy("au", action="AUDIT", rules=EVERYTHING), policy("a", rules=POST)],
        {},
        False,
        "no_allow_policy_matched",
        None,
    ),
    # empty policies
    ("ALLOW without rules denies all", [policy("a")], {}, False, "no_allow_policy_matched", None),
    (
        "ALLOW rules [{}] allows all",
        [policy("a", rules=EVERYTHING)],
        {},
        True,
        "allowed_by_policy",
        "default.a[rules[0]]",
    ),
    (
        "DENY without rules denies nothing",
        [policy("d", action="DENY")],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "DENY rules [{}] denies all",
        [policy("d", action="DENY", rules=EVERYTHING)],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "empty spec is ALLOW without rules",
        [
            {
                "apiVersion": "security.istio.io/v1beta1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "x"},
                "spec": {},
            }
        ],
        {},
        False,
        "no_allow_policy_matched",
        None,
    ),
    # scope
    (
        "root namespace applies mesh-wide",
        [policy("d", namespace="istio-system", action="DENY", rules=GET)],
        {},
        False,
        "denied_by_policy",
        "istio-system.d[rules[0]]",
    ),
    (
        "other namespace ignored",
        [policy("d", namespace="prod", action="DENY", rules=GET)],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "root ALLOW + namespace ALLOW: either",
        [policy("a", namespace="istio-system", rules=POST), policy("b", rules=GET)],
        {},
        True,
        "allowed_by_policy",
        "default.b[rules[0]]",
    ),
    (
        "selector subset matches",
        [policy("d", action="DENY", rules=GET, selector={"matchLabels": {"app": "api"}})],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "selector all labels",
        [
            policy(
                "d",
                action="DENY",
                rules=GET,
                selector={"matchLabels": {"app": "api", "version": "v1"}},
            )
        ],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "selector other labels",
        [policy("d", action="DENY", rules=GET, selector={"matchLabels": {"app": "db"}})],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "selector extra label missing",
        [
            policy(
                "d", action="DENY", rules=GET, selector={"matchLabels": {"app": "api", "tier": "x"}}
            )
        ],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "empty selector is namespace-wide",
        [policy("d", action="DENY", rules=GET, selector={})],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "root selector any namespace",
        [
            policy(
                "d",
                namespace="istio-system",
                action="DENY",
                rules=GET,
                selector={"matchLabels": {"app": "api"}},
            )
        ],
        {},
        False,
        "denied_by_policy",
        "istio-system.d[rules[0]]",
    ),
    (
        "unselected ALLOW does not deny",
        [policy("a", rules=POST, selector={"matchLabels": {"app": "db"}})],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "targetRefs service matches",
        [
            policy(
                "d",
                action="DENY",
                rules=GET,
                targetRefs=[{"kind": "Service", "group": "", "name": "api"}],
            )
        ],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "targetRefs other service",
        [policy("d", action="DENY", rules=GET, targetRefs=[{"kind": "Service", "name": "db"}])],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "targetRefs no service known",
        [policy("d", action="DENY", rules=GET, targetRefs=[{"kind": "Service", "name": "api"}])],
        {"workload_service": None},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "empty targetRefs is namespace-wide",
        [policy("d", action="DENY", rules=GET, targetRefs=[])],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "targetRef (singular)",
        [policy("d", action="DENY", rules=GET, targetRef={"kind": "Service", "name": "api"})],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
    (
        "root targetRefs: only root-namespace Services",
        [
            policy(
                "d",
                namespace="istio-system",
                action="DENY",
                rules=GET,
                targetRefs=[{"kind": "Service", "name": "api"}],
            )
        ],
        {},
        True,
        "no_allow_policy",
        None,
    ),
    (
        "targetRefs any of several",
        [
            policy(
                "d",
                action="DENY",
                rules=GET,
                targetRefs=[{"kind": "Service", "name": "db"}, {"kind": "Service", "name": "api"}],
            )
        ],
        {},
        False,
        "denied_by_policy",
        "default.d[rules[0]]",
    ),
]


@pytest.mark.parametrize(
    ("docs", "overrides", "allowed", "reason", "policy_id"),
    [pytest.param(d, o, a, r, p, id=n) for n, d, o, a, r, p in ORDER_CASES],
)
def test_action_order_scope_and_empty_policies(
    docs: list[dict[str, Any]],
    overrides: dict[str, Any],
    allowed: bool,
    reason: str,
    policy_id: str | None,
) -> None:
    decision = decide(*docs, **overrides)
    assert (decision.allowed, decision.reason, decision.policy_id) == (allowed, reason, policy_id)


def test_deciding_action_is_reported() -> None:
    assert decide(policy("d", action="DENY", rules=GET)).action is Action.DENY
    assert decide(policy("a", rules=POST)).action is Action.ALLOW
    assert decide().action is None


def test_custom_delegates_and_still_carries_deny_allow_outcome() -> None:
    docs = [
        policy("ext", action="CUSTOM", rules=[{"to": [{"operation": {"paths": ["/data"]}}]}]),
        policy("a", rules=GET),
    ]
    decision = decide(*docs)
    assert decision.delegated
    assert decision.custom_provider == "rego"
    assert decision.custom_policy_id == "default.ext[rules[0]]"
    assert decision.allowed
    assert decision.policy_id == "default.a[rules[0]]"

    not_matching = decide(*docs, path="/other")
    assert not not_matching.delegated
    assert not_matching.custom_policy_id is None


def test_custom_before_deny_both_reported() -> None:
    decision = decide(
        policy("ext", action="CUSTOM", rules=EVERYTHING), policy("d", action="DENY", rules=GET)
    )
    assert decision.custom_provider == "rego"
    assert not decision.allowed
    assert decision.policy_id == "default.d[rules[0]]"


def test_audit_policies_are_recorded_whatever_the_decision() -> None:
    decision = decide(
        policy("au1", action="AUDIT", rules=GET),
        policy("au2", action="AUDIT", rules=POST),
        policy("au3", action="AUDIT", namespace="istio-system", rules=[*POST, *GET]),
        policy("d", action="DENY", rules=GET),
    )
    assert not decision.allowed
    # In Envoy's RBAC order: ns[default]-policy[au1] sorts before ns[istio-system]-...
    assert decision.audit_policy_ids == ("default.au1[rules[0]]", "istio-system.au3[rules[1]]")


def test_several_matches_report_the_rule_envoy_reports() -> None:
    # Envoy's RBAC filter tries policy names (ns[NS]-policy[NAME]-rule[i]) in byte
    # order: "-" sorts before "]", "1" before "]", so a-b before a and rule[10] before
    # rule[2]; the root namespace gets no precedence.
    many_rules = [*POST] * 10 + [*GET] * 3
    cases = [
        (
            [policy("a", action="DENY", rules=GET), policy("a-b", action="DENY", rules=GET)],
            "default.a-b[rules[0]]",
        ),
        ([policy("z", action="DENY", rules=many_rules)], "default.z[rules[10]]"),
        (
            [
                policy("a", action="DENY", namespace="istio-system", rules=GET),
                policy("b", action="DENY", rules=GET),
            ],
            "default.b[rules[0]]",
        ),
        ([policy("p", rules=many_rules)], "default.p[rules[10]]"),
    ]
    for docs, expected in cases:
        assert decide(*docs).policy_id == expected
    shadow = decide(policy("s", action="DENY", rules=many_rules, dry_run=True)).dry_run_deny
    assert shadow is not None
    assert shadow.effective_policy_id == "default.s[rules[10]]"
    custom = decide(policy("c", action="CUSTOM", rules=many_rules))
    assert custom.custom_policy_id == "default.c[rules[10]]"


# --- TCP: HTTP-only fields (Istio's RBAC builder: ALLOW rule dropped, DENY field dropped)

TCP = {"is_http": False, "method": None, "path": None, "host": None}

TCP_CASES: list[tuple[str, list[dict[str, Any]], bool, str | None]] = [
    (
        "ALLOW rule with HTTP field never matches",
        [policy("a", rules=[{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}])],
        False,
        None,
    ),
    (
        "ALLOW rule without HTTP fields matches",
        [policy("a", rules=[{"to": [{"operation": {"ports": ["8080"]}}]}])],
        True,
        "default.a[rules[0]]",
    ),
    (
        "ALLOW: only the HTTP rule is dropped",
        [
            policy(
                "a",
                rules=[
                    {"to": [{"operation": {"paths": ["/x"]}}]},
                    {"from": [{"source": {"namespaces": ["default"]}}]},
                ],
            )
        ],
        True,
        "default.a[rules[1]]",
    ),
    (
        "ALLOW: notMethods is HTTP-only too",
        [policy("a", rules=[{"to": [{"operation": {"notMethods": ["DELETE"]}}]}])],
        False,
        None,
    ),
    (
        "ALLOW: when header is HTTP-only",
        [policy("a", rules=[{"when": [{"key": "request.headers[x]", "notValues": ["y"]}]}])],
        False,
        None,
    ),
    (
        "ALLOW: requestPrincipals is HTTP-only",
        [policy("a", rules=[{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}])],
        False,
        None,
    ),
    (
        "DENY drops HTTP field, rest applies",
        [
            policy(
                "d",
                action="DENY",
                rules=[{"to": [{"operation": {"ports": ["8080"], "methods": ["POST"]}}]}],
            )
        ],
        False,
        "default.d[rules[0]]",
    ),
    (
        "DENY rest still must match",
        [
            policy(
                "d",
                action="DENY",
                rules=[{"to": [{"operation": {"ports": ["9090"], "methods": ["POST"]}}]}],
            )
        ],
        True,
        None,
    ),
    (
        "DENY with only HTTP fields denies all TCP",
        [policy("d", action="DENY", rules=[{"to": [{"operation": {"methods": ["POST"]}}]}])],
        False,
        "default.d[rules[0]]",
    ),
    (
        "DENY with only HTTP when denies all TCP",
        [
            policy(
                "d",
                action="DENY",
                rules=[{"when": [{"key": "request.auth.claims[x]", "values": ["y"]}]}],
            )
        ],
        False,
        "default.d[rules[0]]",
    ),
]


@pytest.mark.parametrize(
    ("docs", "allowed", "policy_id"), [pytest.param(d, a, p, id=n) for n, d, a, p in TCP_CASES]
)
def test_tcp_requests_and_http_only_fields(
    docs: list[dict[str, Any]], allowed: bool, policy_id: str | None
) -> None:
    decision = decide(*docs, **TCP)
    assert (decision.allowed, decision.policy_id) == (allowed, policy_id)


def test_http_request_keeps_http_fields() -> None:
    # The same DENY that denies every TCP connection only denies POST over HTTP.
    deny_post = policy("d", action="DENY", rules=[{"to": [{"operation": {"methods": ["POST"]}}]}])
    assert decide(deny_post).allowed
    assert not decide(deny_post, method="POST").allowed


def test_tcp_audit_drops_http_fields_like_deny() -> None:
    au = policy("au", action="AUDIT", rules=[{"to": [{"operation": {"methods": ["POST"]}}]}])
    assert decide(au, **TCP).audit_policy_ids == ("default.au[rules[0]]",)


# --- dry-run: evaluated in shadow engines, never enforced

DRY_CASES: list[
    tuple[str, list[dict[str, Any]], bool, ShadowResult | None, ShadowResult | None]
] = [
    (
        "dry-run DENY matching: enforced allow, shadow denied",
        [policy("d", action="DENY", rules=GET, dry_run=True)],
        True,
        None,
        ShadowResult(False, "default.d[rules[0]]"),
    ),
    (
        "dry-run DENY not matching",
        [policy("d", action="DENY", rules=POST, dry_run=True)],
        True,
        None,
        ShadowResult(True, None),
    ),
    (
        "dry-run ALLOW not matching: no deny-by-default",
        [policy("a", rules=POST, dry_run=True)],
        True,
        ShadowResult(False, None),
        None,
    ),
    (
        "dry-run ALLOW matching",
        [policy("a", rules=[*POST, *GET], dry_run=True)],
        True,
        ShadowResult(True, "default.a[rules[1]]"),
        None,
    ),
    (
        "dry-run alongside enforced DENY",
        [policy("d", action="DENY", rules=GET), policy("a", rules=GET, dry_run=True)],
        False,
        ShadowResult(True, "default.a[rules[0]]"),
        None,
    ),
    (
        "dry-run ALLOW without rules: shadow denies",
        [policy("a", dry_run=True)],
        True,
        ShadowResult(False, None),
        None,
    ),
    (
        "both shadows",
        [
            policy("a", rules=GET, dry_run=True),
            policy("d", action="DENY", rules=EVERYTHING, dry_run=True),
        ],
        True,
        ShadowResult(True, "default.a[rules[0]]"),
        ShadowResult(False, "default.d[rules[0]]"),
    ),
    (
        "dry-run in other namespace ignored",
        [policy("d", namespace="prod", action="DENY", rules=GET, dry_run=True)],
        True,
        None,
        None,
    ),
]


@pytest.mark.parametrize(
    ("docs", "allowed", "shadow_allow", "shadow_deny"),
    [pytest.param(d, a, sa, sd, id=n) for n, d, a, sa, sd in DRY_CASES],
)
def test_dry_run(
    docs: list[dict[str, Any]],
    allowed: bool,
    shadow_allow: ShadowResult | None,
    shadow_deny: ShadowResult | None,
) -> None:
    decision = decide(*docs)
    assert decision.allowed is allowed
    # The shadow engines name the dry-run policies they held, one each in these cases.
    for got, expected, name in (
        (decision.dry_run_allow, shadow_allow, "default.a"),
        (decision.dry_run_deny, shadow_deny, "default.d"),
    ):
        assert got == (None if expected is None else replace(expected, policies=(name,)))


def test_dry_run_false_annotation_is_enforced() -> None:
    doc = policy("d", action="DENY", rules=GET)
    doc["metadata"]["annotations"] = {"istio.io/dry-run": "false"}
    assert not decide(doc).allowed


# --- the namespace index


def test_evaluation_reads_only_root_and_workload_namespace_policies() -> None:
    others = [policy(f"p{i}", namespace=f"ns{i % 50}", rules=EVERYTHING) for i in range(1000)]
    relevant = [
        policy("root", namespace="istio-system", action="AUDIT", rules=EVERYTHING),
        policy("mine", rules=GET),
        policy("mine2", action="DENY", rules=POST, selector={"matchLabels": {"app": "db"}}),
    ]
    policies = load(*others, *relevant)
    assert len(policies.policies) == 1003

    decision = evaluate(policies, request())
    assert decision.policies_considered == 2  # mine2 selects app=db: the index skips it
    assert decision.allowed
    assert decision.policy_id == "default.mine[rules[0]]"
    assert evaluate(policies, request(workload_namespace="ns7")).policies_considered == 1 + 20


def test_evaluation_never_calls_selects_on_other_namespaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from authz.istio_policy import CompiledPolicy

    policies = load(
        *[policy(f"p{i}", namespace=f"ns{i}", rules=EVERYTHING) for i in range(1000)],
        policy("mine", rules=GET),
    )
    seen: list[str] = []
    original = CompiledPolicy.selects

    def counting(self: CompiledPolicy, *args: Any) -> bool:
        seen.append(self.id)
        return original(self, *args)

    monkeypatch.setattr(CompiledPolicy, "selects", counting)
    evaluate(policies, request())
    assert seen == ["default.mine"]


def test_selector_index_finds_exactly_the_policies_that_select_the_workload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from authz.istio_policy import CompiledPolicy

    crowd = [
        policy(f"app{i:04}", rules=EVERYTHING, selector={"matchLabels": {"app": f"svc{i}"}})
        for i in range(1000)
    ]
    mine = [
        policy(
            "a-two-labels", rules=GET, selector={"matchLabels": {"app": "api", "version": "v1"}}
        ),
        policy(
            "b-wrong-version", rules=GET, selector={"matchLabels": {"app": "api", "version": "v2"}}
        ),
        policy("c-namespace", action="AUDIT", rules=EVERYTHING),
        policy("d-empty-selector", rules=GET, selector={"matchLabels": {}}),
        policy("e-service", rules=GET, targetRefs=[{"kind": "Service", "name": "api"}]),
        policy("f-other-service", rules=GET, targetRefs=[{"kind": "Service", "name": "db"}]),
        policy(
            "g-root",
            namespace="istio-system",
            rules=GET,
            selector={"matchLabels": {"version": "v1"}},
        ),
    ]
    policies = load(*crowd, *mine)
    seen: list[str] = []
    original = CompiledPolicy.selects

    def counting(self: CompiledPolicy, *args: Any) -> bool:
        seen.append(self.id)
        return original(self, *args)

    monkeypatch.setattr(CompiledPolicy, "selects", counting)
    decision = evaluate(policies, request())
    # Root first, then name order; the crowd of other apps is never looked at.
    assert seen == [
        "istio-system.g-root",
        "default.a-two-labels",
        "default.b-wrong-version",
        "default.c-namespace",
        "default.d-empty-selector",
        "default.e-service",
    ]
    # Several ALLOW policies match; Envoy's order names ns[default]-policy[a-two-labels].
    assert decision.policy_id == "default.a-two-labels[rules[0]]"
    assert decision.audit_policy_ids == ("default.c-namespace[rules[0]]",)
    # The index only narrows: the same decision as checking every policy's selector.
    for labels in ({"app": "svc7"}, {"app": "api"}, {}, {"version": "v1", "app": "svc3"}):
        view = request(workload_labels=labels, workload_service=None)
        applicable = [
            p.id
            for p in policies.candidates("default", labels)
            if original(p, "default", labels, None)
        ]
        everything = [
            p.id
            for p in policies.in_namespace("istio-system") + policies.in_namespace("default")
            if original(p, "default", labels, None)
        ]
        assert applicable == everything
        assert evaluate(policies, view).policies_considered >= len(applicable)
    svc7 = evaluate(policies, request(workload_labels={"app": "svc7"}, workload_service=None))
    assert svc7.policy_id == "default.app0007[rules[0]]"


def test_policy_set_is_immutable_and_rejects_duplicates() -> None:
    policies = load(policy("a", rules=GET))
    with pytest.raises(AttributeError):
        policies.policies = ()  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"default\.a appears twice"):
        PolicySet(policies.policies * 2)


def test_custom_on_tcp_drops_http_fields_like_deny() -> None:
    ext = policy("ext", action="CUSTOM", rules=[{"to": [{"operation": {"paths": ["/admin"]}}]}])
    assert decide(ext, **TCP).custom_provider == "rego"
    assert decide(ext).custom_provider is None  # HTTP: the path must match
