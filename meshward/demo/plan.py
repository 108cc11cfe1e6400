"""The sample mesh: its workloads (matching policies/), the traffic sent, what must happen.

Every call is made by a workload, through its own sidecar, so it carries that
workload's SPIFFE identity; the expected outcome is what the sample ``policies/`` say
(the DENY, the missing ALLOW, the Rego console, the dry-run policies). Halfway the demo
writes :data:`POLICY_CHANGE` into the policies and the partner's calls change outcome.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "ALLOW",
    "CANDIDATE_CHANGE",
    "PLAN",
    "POLICY_CHANGE",
    "TRUST_DOMAIN",
    "WORKLOADS",
    "Call",
    "Workload",
    "expected_outcomes",
]

TRUST_DOMAIN = "example.org"
ALLOW = "allow"
DRY_RUN_DENY = "allow, dry-run would deny"


@dataclass(slots=True, frozen=True)
class Workload:
    name: str
    namespace: str = "default"
    downstream: tuple[str, ...] = ()  # called for every GET it serves (Bookinfo's graph)
    end_users: bool = False  # its sidecar verifies the demo issuer's tokens (jwt_authn)

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{TRUST_DOMAIN}/ns/{self.namespace}/sa/{self.name}"

    @property
    def principal(self) -> str:
        return self.spiffe_id.removeprefix("spiffe://")

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.name}


WORKLOADS = (
    Workload("frontend"),
    Workload("reviews", downstream=("ratings",)),
    Workload("ratings"),
    Workload("admin", end_users=True),
    Workload("partner", namespace="tenant"),  # a caller from another namespace
)


@dataclass(slots=True, frozen=True)
class Call:
    source: str
    to: str
    method: str
    path: str
    expect: str  # before the policy change
    what: str
    user: str | None = None  # an end user's token from the demo issuer
    mfa: bool = True  # the token's amr holds mfa
    trace: bool = True  # sends a W3C traceparent (reviews-require-trace wants one)
    expect_after: str | None = None  # after the policy change, when it differs
    headers: dict[str, str] = field(default_factory=dict)

    def expected(self, changed: bool) -> str:
        return self.expect_after if changed and self.expect_after else self.expect

    def fanout(self, changed: bool) -> list[tuple[str, str, str]]:
        """The calls the destination makes in turn when it serves this one."""
        target = next(w for w in WORKLOADS if w.name == self.to)
        if self.method != "GET" or not self.expected(changed).startswith(ALLOW):
            return []
        return [(self.to, down, ALLOW) for down in target.downstream]


_RATINGS_WRITES = "deny 403 default.ratings-deny-writes"
PLAN = (
    Call("frontend", "reviews", "GET", "/reviews/1", ALLOW, "the service graph, allowed"),
    Call(
        "frontend",
        "reviews",
        "GET",
        "/reviews/2",
        DRY_RUN_DENY,
        "no traceparent: the dry-run reviews-require-trace would deny",
        trace=False,
    ),
    Call(
        "partner",
        "reviews",
        "GET",
        "/reviews/1",
        "deny 403 no ALLOW matched",
        "another namespace: no ALLOW policy admits it (until the change)",
        expect_after=ALLOW,
    ),
    Call("reviews", "ratings", "DELETE", "/ratings/1", _RATINGS_WRITES, "an Istio DENY"),
    Call("admin", "ratings", "POST", "/ratings/1", ALLOW, "the console may write ratings"),
    Call(
        "frontend",
        "ratings",
        "GET",
        "/debug/vars",
        "deny 403 istio-system.deny-debug-endpoints",
        "the mesh-wide DENY of the root namespace",
    ),
    Call("frontend", "admin", "GET", "/admin/users", ALLOW, "alice's JWT, Rego admits", "alice"),
    Call(
        "frontend",
        "admin",
        "DELETE",
        "/admin/users/7",
        "deny 403 default.admin-rego",
        "bob's JWT: Rego denies with its own JSON body",
        "bob",
    ),
    Call(
        "frontend",
        "admin",
        "GET",
        "/admin/users",
        "deny 401 default.admin-rego",
        "no token: Rego asks for one (401, www-authenticate)",
    ),
    Call(
        "frontend",
        "admin",
        "DELETE",
        "/admin/users/8",
        DRY_RUN_DENY,
        "alice without MFA: the staged Rego package would deny",
        "alice",
        mfa=False,
    ),
    Call("partner", "admin", "GET", "/healthz", ALLOW, "the health check is open to all"),
)

# Written into policies/istio/ halfway: the partner namespace may now read reviews.
POLICY_CHANGE = """\
# Written by `meshward demo` halfway through: the partner may read reviews.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: reviews-partner
  namespace: default
spec:
  selector:
    matchLabels:
      app: reviews
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["example.org/ns/tenant/sa/partner"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/reviews/*"]
"""

# The candidate the demo replays over the recorded traffic: enforce the staged
# reviews-require-trace (drop its dry-run annotation).
CANDIDATE_CHANGE = ("istio/reviews.yaml", '  annotations:\n    istio.io/dry-run: "true"\n')


def expected_outcomes(rounds: tuple[int, int]) -> Counter[tuple[str, str, str]]:
    """(source, destination, outcome) → count, for ``rounds`` before and after the change."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for changed, n in ((False, rounds[0]), (True, rounds[1])):
        for call in PLAN:
            counts[(call.source, call.to, call.expected(changed))] += n
            for row in call.fanout(changed):
                counts[row] += n
    return counts
