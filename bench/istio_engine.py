"""Istio engine decision time with 10, 100 and 1000 policies in the mesh.

The workload under test always has the same 5 policies (2 DENY, 3 ALLOW; the request is
allowed by the last ALLOW rule checked); the other policies are added as a growing mesh
adds them, in two layouts: spread over other namespaces, and all in the workload's own
namespace selecting other apps. The engine indexes policies by namespace and then by
selector, so the cost per decision should stay flat in both: the script prints µs per
decision for each mesh size and the ratio to the 10-policy mesh.

    .venv/bin/python bench/istio_engine.py [--seconds 1]
"""

from __future__ import annotations

import argparse
import time

from authz.istio_engine import evaluate
from authz.istio_loader import parse_documents
from authz.request_view import RequestView

WORKLOAD_POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: {ns}}}
spec:
  action: {action}
  selector: {{matchLabels: {{app: reviews}}}}
  rules:
  - from: [{{source: {{principals: ["{principal}"]}}}}]
    to: [{{operation: {{methods: ["{method}"], paths: ["{path}"]}}}}]
"""


def mesh(size: int, *, same_namespace: bool) -> str:
    docs = []
    # The workload's own five policies: two DENY that do not match, three ALLOW, the
    # last of which matches the request.
    for i, (action, method, path) in enumerate(
        [
            ("DENY", "DELETE", "/reviews/*"),
            ("DENY", "GET", "/admin/{**}"),
            ("ALLOW", "POST", "/reviews/{*}"),
            ("ALLOW", "GET", "/ratings/{*}"),
            ("ALLOW", "GET", "/reviews/{*}"),
        ]
    ):
        docs.append(
            WORKLOAD_POLICIES.format(
                name=f"p{i}",
                ns="shop",
                action=action,
                principal="example.org/ns/shop/sa/productpage",
                method=method,
                path=path,
            )
        )
    for i in range(size - len(docs)):
        other = WORKLOAD_POLICIES.format(
            name=f"other{i}",
            ns="shop" if same_namespace else f"team{i % 97}",
            action="ALLOW",
            principal=f"example.org/ns/team{i % 97}/sa/client",
            method="GET",
            path="/api/{*}",
        )
        docs.append(other.replace("app: reviews", f"app: app{i}"))
    return "---\n".join(docs)


def per_decision_us(size: int, seconds: float, *, same_namespace: bool) -> float:
    policies = parse_documents(
        mesh(size, same_namespace=same_namespace), trust_domain="example.org"
    )
    view = RequestView(
        workload_namespace="shop",
        workload_labels={"app": "reviews", "version": "v1"},
        source_principal="example.org/ns/shop/sa/productpage",
        source_ip="10.0.0.7",
        destination_port=9080,
        method="GET",
        host="reviews.shop.svc",
        path="/reviews/42?full=1",
    )
    decision = evaluate(policies, view)
    assert decision.allowed, decision
    assert decision.policy_id == "shop.p4[rules[0]]", decision
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        for _ in range(100):
            evaluate(policies, view)
        done += 100
    return elapsed / done * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="measuring time per size")
    args = parser.parse_args()
    print(f"{'policies in mesh':>17} {'other policies in':>22} {'µs/decision':>12} {'vs 10':>7}")
    for same_namespace, where in ((False, "other namespaces"), (True, "same ns, other apps")):
        base = None
        for size in (10, 100, 1000):
            us = per_decision_us(size, args.seconds, same_namespace=same_namespace)
            base = base or us
            print(f"{size:>17} {where:>22} {us:>12.1f} {us / base:>7.2f}")
    print("target: cost does not grow with policies of other workloads (ratio about 1)")


if __name__ == "__main__":
    main()
