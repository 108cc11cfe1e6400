"""Policy sets and requests for the RBAC differential test.

Policy sets come from two places: the engine's own table tests (every field,
operator, not* form, template, action, dry-run and scope rule they cover, grouped
into sets) and a grammar of AuthorizationPolicy that draws random policies from
value pools chosen to hit the requests often. Requests are drawn from the same pools.
Everything is generated from one seeded ``random.Random``: a failure names the seed.

The pools know the listeners' ports (policies name them in ``ports`` and
``destination.port``), so sets are generated once the ports are picked.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.authz.test_istio_engine import DRY_CASES, ORDER_CASES, TCP_CASES
from tests.authz.test_istio_matching import CASES as MATCHING_CASES

__all__ = [
    "IDENTITIES",
    "ISSUERS",
    "TRUST_DOMAIN",
    "TRUST_DOMAIN_ALIASES",
    "WORKLOADS",
    "Identity",
    "PolicySetSpec",
    "Request",
    "WorkloadSpec",
    "limit_policy_set",
    "random_policy_sets",
    "random_request",
    "table_policy_sets",
]

TRUST_DOMAIN = "example.org"
TRUST_DOMAIN_ALIASES = ("old.org",)
ISSUERS = ("https://issuer.example", "https://issuer.example/tenant", "other")


@dataclass(slots=True, frozen=True)
class Identity:
    """How a test client connects: TLS with a client certificate (``uri`` and/or
    ``dns`` SAN), TLS without one, or plaintext."""

    name: str
    tls: bool = True
    uri: str | None = None
    dns: str | None = None

    @property
    def has_certificate(self) -> bool:
        return self.uri is not None or self.dns is not None


IDENTITIES = (
    Identity("web", uri="spiffe://example.org/ns/default/sa/web"),
    Identity("db", uri="spiffe://example.org/ns/default/sa/db"),
    Identity("prod-web", uri="spiffe://example.org/ns/prod/sa/web"),
    Identity("alias-web", uri="spiffe://old.org/ns/default/sa/web"),
    Identity("other", uri="spiffe://other.org/ns/foo/sa/bar"),
    # Not <td>/ns/<ns>/sa/<sa>: no namespace or service account for the engine.
    Identity("deep", uri="spiffe://example.org/ns/default/x/y/sa/web"),
    Identity("no-ns", uri="spiffe://example.org/workload/api"),
    Identity("dns-only", dns="api.example.com"),
    Identity("anonymous-tls"),
    Identity("plaintext", tls=False),
)


@dataclass(slots=True, frozen=True)
class WorkloadSpec:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    service: str | None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


WORKLOADS = (
    WorkloadSpec("api", "default", (("app", "api"), ("version", "v1")), "api"),
    WorkloadSpec("db", "default", (("app", "db"),), "db"),
    WorkloadSpec("prod-api", "prod", (("app", "api"), ("version", "v2")), "api"),
)


@dataclass(slots=True)
class PolicySetSpec:
    """AuthorizationPolicy documents to load together, and the workloads to test them on."""

    name: str
    documents: list[dict[str, Any]]
    workloads: tuple[WorkloadSpec, ...]
    ports: dict[str, tuple[int, int]] = field(default_factory=dict)  # workload → (http, tcp)


@dataclass(slots=True, frozen=True)
class Request:
    """One request (or, with ``tcp``, one TCP connection) a client makes."""

    identity: Identity
    source_ip: str
    sni: str | None
    tcp: bool = False
    method: str = "GET"
    path: str = "/"
    host: str = "api.example.com"
    headers: tuple[tuple[str, str], ...] = ()
    claims: dict[str, Any] | None = None

    def describe(self) -> str:
        what = (
            "TCP connection"
            if self.tcp
            else f"{self.method} {self.path} host={self.host!r} headers={list(self.headers)}"
        )
        return (
            f"{what} from {self.identity.name} ({self.identity.uri or self.identity.dns or '-'}) "
            f"at {self.source_ip}, sni={self.sni!r}, jwt={self.claims!r}"
        )


# -- the table tests' policies ------------------------------------------------------


def _document(name: str, namespace: str, action: str, rules: list[Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": action, "rules": rules}
    if action == "CUSTOM":
        spec["provider"] = {"name": "rego"}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def table_policy_sets() -> list[PolicySetSpec]:
    """The engine's table tests, as policy sets, and the translation's edge cases.

    Every matching-table rule becomes a policy (alternately ALLOW, DENY, AUDIT and
    CUSTOM, a dozen per set); every engine-table case keeps its policies, renamed so
    cases can share a set.
    """
    sets: list[PolicySetSpec] = []
    actions = ("ALLOW", "DENY", "AUDIT", "CUSTOM")
    for n, chunk in enumerate(_chunks(MATCHING_CASES, 12)):
        docs = [
            _document(f"m{n:02}-{i:02}", "default", actions[(n + i) % 4], [rule])
            for i, (_, rule, _, _) in enumerate(chunk)
        ]
        sets.append(PolicySetSpec(f"matching-{n:02}", docs, WORKLOADS[:2]))
    cases: list[list[dict[str, Any]]] = [docs for _, docs, *_ in ORDER_CASES]
    cases += [docs for _, docs, *_ in TCP_CASES]
    cases += [docs for _, docs, *_ in DRY_CASES]
    for n, chunk in enumerate(_chunks(cases, 5)):
        docs = []
        for i, case in enumerate(chunk):
            for doc in case:
                renamed = {**doc, "metadata": dict(doc["metadata"])}
                renamed["metadata"]["name"] = f"{doc['metadata']['name']}-{i}"
                docs.append(renamed)
        sets.append(PolicySetSpec(f"engine-{n:02}", docs, (WORKLOADS[0], WORKLOADS[2])))
    return sets + edge_policy_sets()


# Rules where the translation departs from istiod's output to decide as the engine
# does: each must meet requests that tell the two apart.
EDGE_RULES: tuple[dict[str, Any], ...] = (
    {"from": [{"source": {"requestPrincipals": ["https://issuer.example/tenant/team/carol"]}}]},
    {"from": [{"source": {"requestPrincipals": ["https://issuer.example/tenant/*"]}}]},
    {"from": [{"source": {"requestPrincipals": ["*/team/carol"]}}]},
    {"from": [{"source": {"requestPrincipals": ["*carol"], "notRequestPrincipals": ["other/*"]}}]},
    {"from": [{"source": {"namespaces": ["default"]}}]},
    {"from": [{"source": {"serviceAccounts": ["default/web"]}}]},
    {"from": [{"source": {"trustDomains": ["old.org"]}}]},
    {"from": [{"source": {"principals": ["*/sa/web"]}}]},
    {"from": [{"source": {"principals": ["*"]}}]},
    {"from": [{"source": {"notPrincipals": ["*"], "ipBlocks": ["127.0.0.2/31"]}}]},
    {"to": [{"operation": {"hosts": ["[::1]"]}}]},
    {"to": [{"operation": {"hosts": ["*.local"]}}]},
    {"to": [{"operation": {"hosts": ["DB.local"], "methods": ["*T"]}}]},
    {"when": [{"key": "request.headers[x-team]", "values": ["*"]}]},
    {"when": [{"key": "request.headers[x-team]", "values": ["blue,red"]}]},
    {"to": [{"operation": {"paths": ["/v1/{*}/42", "/a.b/{*}"]}}]},
    {"to": [{"operation": {"paths": ["/v1/{**}"], "notPaths": ["*/42"]}}]},
    {"when": [{"key": "request.auth.claims[groups]", "values": ["ops"]}]},
    {"when": [{"key": "request.auth.claims[org][team]", "values": ["pay*"]}]},
    {"when": [{"key": "request.auth.audiences", "notValues": ["admin"]}]},
    {"when": [{"key": "connection.sni", "values": ["*"]}]},
    {"when": [{"key": "remote.ip", "values": ["127.0.0.2"]}]},
    {"when": [{"key": "source.principal", "values": ["example.org/ns/default/*"]}]},
    {"when": [{"key": "source.namespace", "notValues": ["prod"]}]},
)


def edge_policy_sets() -> list[PolicySetSpec]:
    """``EDGE_RULES`` four at a time, one per action, so each one's effect shows."""
    sets = []
    actions = ("CUSTOM", "AUDIT", "DENY", "ALLOW")
    for n, chunk in enumerate(_chunks(EDGE_RULES, 4)):
        docs = [
            _document(f"e{n:02}-{action.lower()}", "default", action, [rule])
            for action, rule in zip(actions, chunk, strict=False)
        ]
        sets.append(PolicySetSpec(f"edge-{n:02}", docs, WORKLOADS[:2]))
    return sets


def limit_policy_set() -> PolicySetSpec:
    """The longest value of each regex-backed form the translation accepts (one more
    byte is refused): Envoy must accept them all."""
    rules = [
        {"from": [{"source": {"principals": ["*" + "p" * 80]}}]},
        {"from": [{"source": {"namespaces": ["n" * 69]}}]},
        {"from": [{"source": {"namespaces": ["*" + "n" * 64]}}]},
        {"from": [{"source": {"trustDomains": ["t" * 64 + "*"]}}]},
        {"from": [{"source": {"serviceAccounts": ["s" * 40 + "/" + "a" * 34]}}]},
        {"to": [{"operation": {"hosts": ["*h" + "h]" * 13]}}]},
    ]
    docs = [_document(f"limit-{i}", "default", "DENY", [rule]) for i, rule in enumerate(rules)]
    return PolicySetSpec("limits", docs, WORKLOADS[:1])


# -- the grammar ----------------------------------------------------------------------

PRINCIPALS = (
    "example.org/ns/default/sa/web",
    "example.org/ns/default/sa/db",
    "old.org/ns/default/sa/web",
    "example.org/ns/default/*",
    "*/sa/web",
    "*",
    "other.org/*",
    "example.org/ns/*/sa/web",
    "*/x/y/sa/web",
)
REQUEST_PRINCIPALS = (
    "https://issuer.example/alice",
    "https://issuer.example/tenant/team/carol",
    "https://issuer.example/*",
    "https://issuer.example/tenant/*",
    "*/alice",
    "*/carol",
    "*team/carol",
    "https:*",
    "other/bob",
    "*",
)
NAMESPACES = ("default", "prod", "def*", "*od", "*", "foo")
SERVICE_ACCOUNTS = ("default/web", "prod/web", "default/db")
TRUST_DOMAINS = ("example.org", "old.org", "*.org", "other*")
IP_BLOCKS = ("127.0.0.1", "127.0.0.2/31", "127.0.0.0/8", "10.0.0.0/8", "203.0.113.0/24")
HOSTS = (
    "api.example.com",
    "*.example.com",
    "api.*",
    "API.Example.COM",
    "*",
    "[::1]",
    "db.local:9090",
    "*.local",
    "*local",
)
METHODS = ("GET", "POST", "G*", "*T", "*", "get")
PATHS = (
    "/v1/items/42",
    "/v1/*",
    "*/42",
    "/v1/{*}/42",
    "/v1/{**}",
    "/{*}/items/{**}",
    "*",
    "/admin",
    "/admin/*",
    "/a.b/{*}",
    "/v1/items/{*}",
    "/v1/{**}/42",
    "/custom/*",
)
SNIS = ("api.example.com", "*.example.com", "db.*", "*")
CLAIM_KEYS: dict[str, tuple[str, ...]] = {
    "request.auth.audiences": ("api", "admin", "ad*", "*"),
    "request.auth.presenter": ("cli", "*"),
    "request.auth.claims[groups]": ("dev", "ops", "*"),
    "request.auth.claims[org][team]": ("pay*", "search", "*"),
    "request.auth.claims[tier]": ("gold", "*"),
    "request.auth.claims[admin]": ("true",),
}
HEADER_KEYS: dict[str, tuple[str, ...]] = {
    "request.headers[x-team]": ("blue", "red", "bl*", "*ue", "*", "blue,red"),
    "request.headers[x-env]": ("prod", "*"),
}
POLICY_NAMES = ("a", "a-b", "b", "z", "allow-1", "deny", "x.y", "a1")


class _Grammar:
    def __init__(self, rng: random.Random, ports: Sequence[int]) -> None:
        self.rng = rng
        self.ports = (*tuple(str(p) for p in ports), "1")

    def pick(self, pool: Sequence[str], most: int = 3) -> list[str]:
        return self.rng.sample(list(pool), self.rng.randint(1, min(most, len(pool))))

    def field(self, body: dict[str, Any], name: str, pool: Sequence[str]) -> None:
        key = name if self.rng.random() < 0.75 else "not" + name[0].upper() + name[1:]
        body[key] = self.pick(pool)

    def source(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        options = {
            "principals": PRINCIPALS,
            "requestPrincipals": REQUEST_PRINCIPALS,
            "namespaces": NAMESPACES,
            # <serviceaccount> alone (the policy's namespace) is for the field only.
            "serviceAccounts": (*SERVICE_ACCOUNTS, "web"),
            "trustDomains": TRUST_DOMAINS,
            "ipBlocks": IP_BLOCKS,
            "remoteIpBlocks": IP_BLOCKS,
        }
        for name in self.rng.sample(list(options), self.rng.randint(1, 2)):
            if name == "serviceAccounts" and {"principals", "namespaces"} & {
                k.removeprefix("not").lower() for k in body
            }:
                continue  # Istio: serviceAccounts exclude principals and namespaces
            if name in ("principals", "namespaces") and any("erviceAccounts" in k for k in body):
                continue
            self.field(body, name, options[name])
        return {"source": body}

    def operation(self) -> dict[str, Any]:
        body: dict[str, Any] = {}
        options = {"hosts": HOSTS, "ports": self.ports, "methods": METHODS, "paths": PATHS}
        for name in self.rng.sample(list(options), self.rng.randint(1, 2)):
            self.field(body, name, options[name])
        return {"operation": body}

    def condition(self) -> dict[str, Any]:
        keys: dict[str, Sequence[str]] = {
            **HEADER_KEYS,
            **CLAIM_KEYS,
            "source.ip": IP_BLOCKS,
            "remote.ip": IP_BLOCKS,
            "source.namespace": NAMESPACES,
            "source.principal": PRINCIPALS,
            "request.auth.principal": REQUEST_PRINCIPALS,
            "destination.ip": ("127.0.0.1", "10.0.0.0/8"),
            "destination.port": self.ports,
            "connection.sni": SNIS,
            "source.serviceAccount": SERVICE_ACCOUNTS,
            "source.trustDomain": TRUST_DOMAINS,
        }
        key = self.rng.choice(list(keys))
        condition: dict[str, Any] = {"key": key}
        roll = self.rng.random()
        if roll < 0.6:
            condition["values"] = self.pick(keys[key])
        elif roll < 0.85:
            condition["notValues"] = self.pick(keys[key])
        else:
            condition["values"] = self.pick(keys[key])
            condition["notValues"] = self.pick(keys[key])
        return condition

    def rule(self) -> dict[str, Any]:
        rule: dict[str, Any] = {}
        if self.rng.random() < 0.5:
            rule["from"] = [self.source() for _ in range(self.rng.randint(1, 2))]
        if self.rng.random() < 0.6:
            rule["to"] = [self.operation() for _ in range(self.rng.randint(1, 2))]
        if self.rng.random() < 0.4:
            rule["when"] = [self.condition() for _ in range(self.rng.randint(1, 2))]
        return rule

    def policy(self, name: str, namespace: str) -> dict[str, Any]:
        roll = self.rng.random()
        action = (
            "ALLOW"
            if roll < 0.4
            else "DENY"
            if roll < 0.7
            else "AUDIT"
            if roll < 0.85
            else "CUSTOM"
        )
        count = self.rng.choices((0, 1, 2, 3), weights=(1, 12, 5, 2))[0]
        doc = _document(name, namespace, action, [self.rule() for _ in range(count)])
        if count == 0 and self.rng.random() < 0.5:
            del doc["spec"]["rules"]
        if action in ("ALLOW", "DENY") and self.rng.random() < 0.2:
            doc["metadata"]["annotations"] = {"istio.io/dry-run": "true"}
        scope = self.rng.random()
        if scope < 0.3:
            labels = self.rng.choice(
                ({"app": "api"}, {"app": "db"}, {"app": "api", "version": "v2"})
            )
            doc["spec"]["selector"] = {"matchLabels": labels}
        elif scope < 0.45:
            service = self.rng.choice(("api", "db"))
            doc["spec"]["targetRefs"] = [{"kind": "Service", "group": "", "name": service}]
        return doc


def random_policy_sets(
    rng: random.Random, port_groups: Sequence[Sequence[int]]
) -> list[PolicySetSpec]:
    """One random set of 2-6 policies per group of four ports: the HTTP and TCP ports
    of its two workloads, which its rules may name."""
    sets = []
    for n, ports in enumerate(port_groups):
        grammar = _Grammar(rng, ports)
        docs = []
        used: set[tuple[str, str]] = set()
        for _ in range(rng.randint(2, 6)):
            namespace = rng.choices(("default", "prod", "istio-system", "other"), (6, 2, 2, 1))[0]
            name = rng.choice(POLICY_NAMES)
            if (namespace, name) in used:
                continue
            used.add((namespace, name))
            docs.append(grammar.policy(name, namespace))
        workloads = (WORKLOADS[0], WORKLOADS[1 + n % 2])
        spec = PolicySetSpec(f"random-{n:02}", docs, workloads)
        spec.ports = {
            workloads[0].name: (ports[0], ports[1]),
            workloads[1].name: (ports[2], ports[3]),
        }
        sets.append(spec)
    return sets


# -- requests -------------------------------------------------------------------------

REQUEST_PATHS = (
    "/v1/items/42",
    "/v1/items/42?x=1",
    "/v1/items/",
    "/v1/",
    "/v1",
    "/admin",
    "/admin/users",
    "/a.b/c",
    "/axb/c",
    "/v1/items/42/43",
    "/",
    "/V1/items/42",
    "/v1/a%2Fb/42",
    "/custom/x",
)
REQUEST_HOSTS = (
    "api.example.com",
    "API.Example.COM",
    "api.example.com:8080",
    "db.local",
    "db.local:9090",
    "[::1]:80",
    "[::1]",
    "other.org",
)
CLAIM_POOLS: dict[str, tuple[Any, ...]] = {
    "aud": (["api", "admin"], "api", None),
    "azp": ("cli", None),
    "groups": (["dev", "ops"], ["dev"], None),
    "org": ({"team": "payments", "tags": ["a", "b"]}, {"team": "search"}, None),
    "admin": (True, None),
    "tier": ("gold", "silver", None),
}


def random_request(rng: random.Random, *, tcp: bool) -> Request:
    identity = rng.choice(IDENTITIES)
    sni = rng.choice((None, "api.example.com", "db.local")) if identity.tls else None
    source_ip = rng.choice(("127.0.0.1", "127.0.0.2", "127.0.0.3"))
    if tcp:
        return Request(identity, source_ip, sni, tcp=True)
    headers: list[tuple[str, str]] = []
    team = rng.choice((None, "blue", "red", ("blue", "red"), ""))
    if isinstance(team, tuple):
        headers += [("x-team", t) for t in team]
    elif team is not None:
        headers.append(("x-team", team))
    if (env := rng.choice((None, "prod", "dev"))) is not None:
        headers.append(("x-env", env))
    if (xff := rng.choice((None, "203.0.113.9", "10.0.0.1, 203.0.113.9"))) is not None:
        headers.append(("x-forwarded-for", xff))
    claims = None
    if rng.random() < 0.6:
        claims = {"iss": rng.choice(ISSUERS), "sub": rng.choice(("alice", "bob", "team/carol"))}
        for key, pool in CLAIM_POOLS.items():
            value = rng.choice(pool)
            if value is not None:
                claims[key] = value
    return Request(
        identity,
        source_ip,
        sni,
        method=rng.choice(("GET", "POST", "DELETE", "PATCH")),
        path=rng.choice(REQUEST_PATHS),
        host=rng.choice(REQUEST_HOSTS),
        headers=tuple(headers),
        claims=claims,
    )
