"""``meshward demo``: the sample mesh on this machine, driven, checked and explained.

``meshward up`` (server, agent, authz, audit) on a fresh data dir; for every workload
of :mod:`meshward.demo.plan` an application process and an Envoy sidecar whose SPIFFE
identity the agent attests (as root each Envoy runs as a uid of its own, ``unix:uid``;
otherwise each runs from a hard link of its own, ``unix:path``); the traffic of the plan
through the sidecars, a policy change halfway, short SVIDs so that they rotate under
load; then the outcomes as the audit trail recorded them, next to the expected ones.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.admin_client import AdminClient
from meshward.config import ConfigError
from meshward.demo.plan import (
    ALLOW,
    CANDIDATE_CHANGE,
    DRY_RUN_DENY,
    PLAN,
    POLICY_CHANGE,
    TRUST_DOMAIN,
    WORKLOADS,
    Call,
    Workload,
    expected_outcomes,
)
from meshward.demo.sidecar import Sidecar, envoy_binary, link_binary
from meshward.envoy_bootstrap import AuthzMode, JwtIssuer, Upstream, sidecar_bootstrap

__all__ = ["DemoSettings", "run_demo"]

_ISSUER = "https://issuer.demo.meshward.example"
_FIRST_UID = 61000  # as root, workload i's Envoy runs as uid 61000 + i
_RBAC_DENIED = "RBAC: access denied"  # the body of a denial by Envoy's RBAC filter
_STARTUP = 60.0  # seconds any one part may take to come up before the demo gives up


@dataclass(slots=True, frozen=True)
class DemoSettings:
    duration: float = 80.0  # seconds of traffic, the policy change at half
    svid_ttl: int = 60  # seconds; the agent renews at about half
    pause: float = 0.25  # between rounds of the plan
    identity: str = "auto"  # uid (root only), path, or auto
    data_dir: Path | None = None
    keep: bool = False
    report: Path | None = None  # the results as JSON too
    # hybrid: Envoy's RBAC filters (over ECDS) enforce the Istio policies, ext_authz runs
    # where Rego must; ext_authz: every request asks meshward authz.
    authz_mode: AuthzMode = AuthzMode.HYBRID


_handed_out: set[int] = set()


def _free_port() -> int:
    """A port free now and not handed out before in this process.

    The kernel may give a port it just gave again once its socket is closed: the demo's
    authz health and audit listeners once got the same one, and authz could not start.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _say(text: str) -> None:
    print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n\033[1m== {text}\033[0m")


def _wait(what: str, check: Callable[[], bool], timeout: float = _STARTUP) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise ConfigError(f"demo: {what} did not happen within {timeout:.0f}s")
        time.sleep(0.1)


def _get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class _Ports:
    server_health: int = field(default_factory=_free_port)
    agent_health: int = field(default_factory=_free_port)
    authz: int = field(default_factory=_free_port)
    authz_health: int = field(default_factory=_free_port)
    audit: int = field(default_factory=_free_port)


@dataclass
class _Node:
    """A workload's ports and processes."""

    workload: Workload
    app: int = field(default_factory=_free_port)
    control: int = field(default_factory=_free_port)
    inbound: int = field(default_factory=_free_port)
    outbound: int = field(default_factory=_free_port)
    uid: int | None = None
    binary: Path | None = None
    sidecar: Sidecar | None = None
    serials: list[tuple[str, ...]] = field(default_factory=list)


class _Issuer:
    """The demo's end-user token issuer: one P-256 key, its JWKS for jwt_authn."""

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks = directory / "end-users.jwks.json"
        self.jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "demo", "alg": "ES256"}]}))
        self.jwks.chmod(0o644)

    def token(self, user: str, *, mfa: bool) -> str:
        now = datetime.now(UTC)
        claims = {
            "iss": _ISSUER,
            "sub": user,
            "amr": ["pwd", "mfa"] if mfa else ["pwd"],
            "iat": now,
            "exp": now + timedelta(hours=1),
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "demo"})


def _identity_mode(asked: str) -> str:
    if asked == "auto":
        return "uid" if os.geteuid() == 0 else "path"
    if asked == "uid" and os.geteuid() != 0:
        raise ConfigError("--identity uid runs each Envoy as its own uid, which needs root")
    return asked


@dataclass
class Mesh:
    settings: DemoSettings
    data_dir: Path
    mode: str
    stack: ExitStack
    ports: _Ports = field(default_factory=_Ports)
    nodes: dict[str, _Node] = field(default_factory=dict)
    up: subprocess.Popen[bytes] | None = None
    apps: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def policies(self) -> Path:
        return self.data_dir / "policies"

    @property
    def audit_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.audit}"

    @property
    def logs(self) -> Path:
        return self.data_dir / "logs"

    # -- starting ----------------------------------------------------------------------

    def start_control_plane(self, sample: Path) -> None:
        shutil.copytree(sample, self.policies)
        self.logs.mkdir()
        config = self.data_dir / "meshward.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "trust_domain": TRUST_DOMAIN,
                    "log_level": "warning",
                    "server": {
                        "health_listen": f"127.0.0.1:{self.ports.server_health}",
                        "node_listen": "",  # one node: the agent runs inside `up`
                    },
                    "agent": {
                        "health_listen": f"127.0.0.1:{self.ports.agent_health}",
                        "discover_workload_path": self.mode == "path",
                    },
                    "authz": {
                        "listen": f"127.0.0.1:{self.ports.authz}",
                        "health_listen": f"127.0.0.1:{self.ports.authz_health}",
                    },
                    "audit": {"listen": f"127.0.0.1:{self.ports.audit}"},
                }
            )
        )
        log = (self.logs / "up.log").open("wb")
        self.stack.callback(log.close)
        command = [sys.executable, "-m", "meshward", "up", "--config", str(config)]
        self.up = subprocess.Popen(
            [*command, "--data-dir", str(self.data_dir), "--policies", str(self.policies)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.stack.callback(self._stop_up)
        for name, port in (
            ("authz", self.ports.authz_health),
            ("the audit store", self.ports.audit),
            ("the agent", self.ports.agent_health),
        ):
            _wait(f"{name} ready (see {self.logs / 'up.log'})", partial(self._ready, port))

    def _ready(self, port: int) -> bool:
        if self.up is not None and self.up.poll() is not None:
            raise ConfigError(f"demo: meshward up exited; see {self.logs / 'up.log'}")
        return _get_ok(f"http://127.0.0.1:{port}/ready")

    def _stop_up(self) -> None:
        if self.up is not None and self.up.poll() is None:
            self.up.terminate()
            try:
                self.up.wait(60)
            except subprocess.TimeoutExpired:
                self.up.kill()
                self.up.wait(5)

    def register(self, node: _Node, index: int, envoy: Path) -> list[str]:
        if self.mode == "uid":
            node.uid = _FIRST_UID + index
            node.binary = envoy
            selectors = [f"unix:uid:{node.uid}"]
        else:
            node.binary = link_binary(envoy, self.data_dir / "bin" / node.workload.name / "envoy")
            selectors = [f"unix:uid:{os.getuid()}", f"unix:path:{node.binary}"]
        with AdminClient(self.data_dir / "admin" / "admin.sock") as admin:
            admin.json(
                "POST",
                "/v1/entries",
                json={
                    "spiffe_id": node.workload.spiffe_id,
                    "selectors": selectors,
                    "x509_svid_ttl": self.settings.svid_ttl,
                },
            )
        return selectors

    def start_workload(self, node: _Node, issuer: _Issuer) -> None:
        w = node.workload
        log = (self.logs / f"{w.name}.app.log").open("wb")
        self.stack.callback(log.close)
        app = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward.demo.app",
                w.name,
                str(node.app),
                str(node.control),
                str(node.outbound),
                ",".join(w.downstream),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.apps.append(app)
        bootstrap = sidecar_bootstrap(
            workload=w.name,
            namespace=w.namespace,
            labels=w.labels,
            service=w.name,
            agent_socket=self.data_dir / "agent.sock",
            authz_port=self.ports.authz,
            app_port=node.app,
            inbound_port=node.inbound,
            admin_port=0,
            outbound_port=node.outbound,
            upstreams=[
                Upstream(other.workload.name, other.inbound, other.workload.spiffe_id)
                for other in self.nodes.values()
                if other is not node
            ],
            jwt_issuer=JwtIssuer(_ISSUER, issuer.jwks) if w.end_users else None,
            authz_mode=self.settings.authz_mode,
            # reviews-require-trace reads it: replay of Envoy's decisions needs it kept.
            logged_headers=("traceparent",),
            # Its own file: an Envoy of another uid may not reopen our /dev/stdout.
            access_log=str(self.data_dir / "workloads" / w.name / "access.log"),
        )
        assert node.binary is not None
        node.sidecar = Sidecar.start(
            w.name,
            node.binary,
            bootstrap,
            self.data_dir / "workloads" / w.name,
            self.logs / f"{w.name}.envoy.log",
            uid=node.uid,
        )

    def stop_workloads(self) -> None:
        for node in self.nodes.values():
            if node.sidecar is not None:
                node.sidecar.stop()
        for app in self.apps:
            app.terminate()
        for app in self.apps:
            app.wait(10)

    # -- traffic -----------------------------------------------------------------------

    def send(self, call: Call, issuer: _Issuer, client: httpx.Client) -> dict[str, Any]:
        headers = dict(call.headers)
        if call.trace:
            headers["traceparent"] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        if call.user is not None:
            headers["authorization"] = f"Bearer {issuer.token(call.user, mfa=call.mfa)}"
        node = self.nodes[call.source]
        response = client.post(
            f"http://127.0.0.1:{node.control}/call",
            json={"to": call.to, "method": call.method, "path": call.path, "headers": headers},
        )
        result: dict[str, Any] = response.json()
        return result

    def chain_version(self, workload: str) -> str | None:
        """The RBAC chain ``workload``'s sidecar acknowledged over ECDS (hybrid mode)."""
        ready = httpx.get(f"http://127.0.0.1:{self.ports.agent_health}/ready", timeout=5).json()
        for envoy in (ready.get("native_policies") or {}).get("envoys", []):
            if envoy.get("envoy") == workload:
                version: str | None = envoy.get("version")
                return version
        return None

    def served_version(self) -> str | None:
        ready = httpx.get(f"http://127.0.0.1:{self.ports.authz_health}/ready", timeout=5).json()
        version: str | None = (ready.get("policy_set") or {}).get("version")
        return version


def _live(sidecar: Sidecar) -> bool:
    if sidecar.process.poll() is not None:
        raise ConfigError(f"demo: {sidecar.name}'s Envoy exited; see {sidecar.log_path}")
    return sidecar.ready()


def _rotated(node: _Node) -> bool:
    assert node.sidecar is not None
    return node.sidecar.serials() not in ((), node.serials[0])


def _is_policy_answer(call: Call, expected: str, result: dict[str, Any]) -> bool:
    """The client got what the policy decided: the destination's answer when allowed; when
    denied, the status expected, from meshward (a decision id) or Envoy's RBAC filter."""
    status = result.get("status")
    if expected.startswith(ALLOW):
        try:
            answered = json.loads(result.get("body") or "{}").get("workload")
        except ValueError:
            answered = None
        return status == 200 and answered == call.to
    decision = (result.get("headers") or {}).get("x-meshward-decision-id")
    by_rbac = result.get("body") == _RBAC_DENIED
    return (bool(decision) or by_rbac) and str(status) == expected.split()[1]


@dataclass
class _Traffic:
    sent: int = 0
    rounds: list[int] = field(default_factory=lambda: [0, 0])
    failures: list[str] = field(default_factory=list)


def _drive(mesh: Mesh, issuer: _Issuer, traffic: _Traffic, phase: int, seconds: float) -> None:
    changed = phase == 1
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=15) as client:
        while time.monotonic() < deadline or traffic.rounds[phase] == 0:
            for call in PLAN:
                result = mesh.send(call, issuer, client)
                traffic.sent += 1
                expected = call.expected(changed)
                if not _is_policy_answer(call, expected, result):
                    traffic.failures.append(
                        f"{call.source} → {call.to} {call.method} {call.path}: expected "
                        f"{expected}, got {result.get('status')} {result.get('error', '')}"
                        f"{(result.get('body') or '')[:200]}"
                    )
            traffic.rounds[phase] += 1
            time.sleep(mesh.settings.pause)


def _outcome(record: dict[str, Any]) -> str:
    if record["allowed"]:
        return DRY_RUN_DENY if record.get("dry_run_flips") else ALLOW
    return f"deny {record.get('status')} {record.get('policy') or 'no ALLOW matched'}"


def _recorded(mesh: Mesh) -> Iterator[dict[str, Any]]:
    with httpx.stream(
        "GET",
        f"{mesh.audit_url}/v1/decisions/export",
        params={"since": "1h", "format": "jsonl"},
        timeout=60,
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line:
                yield json.loads(line)


def _by_name() -> dict[str, str]:
    return {w.principal: w.name for w in WORKLOADS}


def _observed(records: list[dict[str, Any]]) -> Counter[tuple[str, str, str]]:
    names = _by_name()
    return Counter(
        (
            names.get(r.get("source_principal") or "", str(r.get("source_principal"))),
            str(r.get("destination_workload")),
            _outcome(r),
        )
        for r in records
    )


def _table(expected: Counter[tuple[str, str, str]], observed: Counter[tuple[str, str, str]]) -> str:
    rows = sorted(set(expected) | set(observed))
    header = ("source", "destination", "outcome", "expected", "recorded", "")
    lines = [header]
    for key in rows:
        mark = "ok" if expected[key] == observed[key] else "MISMATCH"
        lines.append((*key, str(expected[key]), str(observed[key]), mark))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "meshward", *args], capture_output=True, text=True, check=False
    )
    return (done.stdout + done.stderr).rstrip()


@contextmanager
def _data_dir(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=False)
        yield given.resolve()
        return
    # Short: the admin socket path under it must fit in 107 bytes.
    yield Path(tempfile.mkdtemp(prefix="meshward-demo.", dir="/tmp")).resolve()


def run_demo(settings: DemoSettings, sample_policies: Path) -> int:
    """Run the demo; 0 when every outcome matched and nothing failed but by policy."""
    mode = _identity_mode(settings.identity)
    envoy = envoy_binary()
    with _data_dir(settings.data_dir) as data_dir, ExitStack() as stack:
        # Envoys running as other uids traverse it; keys stay in 0700 directories below.
        data_dir.chmod(0o755)
        mesh = Mesh(settings, data_dir, mode, stack)
        _step(f"meshward up --data-dir {data_dir} --policies {mesh.policies}")
        mesh.start_control_plane(sample_policies)
        _say(
            f"server, agent (unix://{data_dir}/agent.sock), authz (127.0.0.1:{mesh.ports.authz}) "
            f"and audit ({mesh.audit_url}/) up; trust domain {TRUST_DOMAIN}; logs in {mesh.logs}"
        )
        issuer = _Issuer(data_dir)
        _step(
            "workload identities: "
            + (
                "each Envoy runs as a uid of its own (unix:uid selectors, as root)"
                if mode == "uid"
                else "each Envoy runs from a hard link of its own (unix:path selectors, no root)"
            )
        )
        mesh.nodes = {w.name: _Node(w) for w in WORKLOADS}
        for index, node in enumerate(mesh.nodes.values()):
            selectors = mesh.register(node, index, envoy)
            _say(f"  {node.workload.spiffe_id:45}  {' '.join(selectors)}")
        stack.callback(mesh.stop_workloads)
        enforcement = (
            "Istio policies in each Envoy's RBAC filters (from the agent over ECDS, audited "
            "over the access-log service), ext_authz only where Rego decides"
            if settings.authz_mode is AuthzMode.HYBRID
            else "every request asks meshward authz (ext_authz)"
        )
        _step(
            f"{len(mesh.nodes)} workloads, each an application and its Envoy sidecar "
            f"({settings.authz_mode} mode: {enforcement})"
        )
        for node in mesh.nodes.values():
            mesh.start_workload(node, issuer)
        for node in mesh.nodes.values():
            sidecar = node.sidecar
            assert sidecar is not None
            _wait(
                f"{node.workload.name}'s sidecar LIVE (see {sidecar.log_path})",
                partial(_live, sidecar),
            )
            node.serials.append(sidecar.serials())
            _say(
                f"  {node.workload.name:9} app :{node.app}  sidecar in :{node.inbound} "
                f"out :{node.outbound}  SVID serial {', '.join(node.serials[0])}"
            )
        traffic = _Traffic()
        half = settings.duration / 2
        _step(
            f"traffic: {len(PLAN)} kinds of call per round for {half:.0f}s, SVIDs of "
            f"{settings.svid_ttl}s rotating meanwhile"
        )
        for call in PLAN:
            _say(f"  {call.source:8} → {call.to:7} {call.method:6} {call.path:15} {call.what}")
        _drive(mesh, issuer, traffic, 0, half)
        _step("policy change: policies/istio/reviews-partner.yaml (the partner may read reviews)")
        before = mesh.served_version()
        hybrid = settings.authz_mode is AuthzMode.HYBRID
        chain = mesh.chain_version("reviews") if hybrid else None
        (mesh.policies / "istio" / "reviews-partner.yaml").write_text(POLICY_CHANGE)
        _wait("the policy change served", lambda: mesh.served_version() != before)
        _say(f"  authz hot-reloaded: policy set {before} → {mesh.served_version()}")
        if hybrid:
            # The agent reloads the same files on its own, and pushes reviews' new chain.
            _wait("reviews' new RBAC chain", lambda: mesh.chain_version("reviews") != chain)
            _say(
                f"  the agent pushed reviews' sidecar a new RBAC chain over ECDS: {chain} → "
                f"{mesh.chain_version('reviews')}"
            )
        _drive(mesh, issuer, traffic, 1, half)
        _step("certificate rotation: the SVID serials each sidecar served")
        for node in mesh.nodes.values():
            sidecar = node.sidecar
            assert sidecar is not None
            # Traffic ran about one TTL; wait out the rest of one if a renewal is pending.
            _wait(
                f"a rotation in {node.workload.name}'s sidecar",
                partial(_rotated, node),
                timeout=settings.svid_ttl,
            )
            node.serials.append(sidecar.serials())
            _say(
                f"  {node.workload.name:9} {', '.join(node.serials[0])} → "
                f"{', '.join(node.serials[-1])}"
            )
        expected = expected_outcomes((traffic.rounds[0], traffic.rounds[1]))
        total = sum(expected.values())
        # Envoy reports what its RBAC filters decided in batches, about every second. Past
        # the deadline the table below shows what is missing.
        deadline = time.monotonic() + _STARTUP
        while len(records := list(_recorded(mesh))) < total and time.monotonic() < deadline:
            time.sleep(0.5)
        observed = _observed(records)
        _step(
            f"outcomes: {traffic.sent} calls ({traffic.rounds[0]} rounds before the change, "
            f"{traffic.rounds[1]} after) and the calls they caused, as the audit trail recorded them"
        )
        _say(_table(expected, observed))
        _say(f"\nfailed requests that were not policy denials: {len(traffic.failures)}")
        for failure in traffic.failures[:10]:
            _say(f"  {failure}")
        # An Istio denial: everything it was decided on is in the trail, so explain can
        # decide it again (a Rego denial here read the bearer token, which is never kept).
        example = next(
            (
                r["decision_id"]
                for r in records
                if _outcome(r) == "deny 403 default.ratings-deny-writes"
            ),
            None,
        )
        if example:
            _step(f"meshward audit explain {example}")
            _say(_cli("audit", "explain", example, "--audit-url", mesh.audit_url))
        candidate = data_dir / "candidate"
        shutil.copytree(mesh.policies, candidate)
        name, annotation = CANDIDATE_CHANGE
        text = (candidate / name).read_text()
        (candidate / name).write_text(text.replace(annotation, ""))
        _step(
            f"meshward policy replay --policies {candidate}   (reviews-require-trace enforced, "
            "over the recorded traffic)"
        )
        _say(
            _cli(
                "policy",
                "replay",
                "--policies",
                str(candidate),
                "--audit-url",
                mesh.audit_url,
                "--trust-domain",
                TRUST_DOMAIN,
                "--since",
                "1h",
            )
        )
        ok = expected == observed and not traffic.failures
        rotated = all(n.serials[0] != n.serials[-1] for n in mesh.nodes.values())
        if settings.report is not None:
            settings.report.write_text(
                json.dumps(
                    {
                        "mode": mode,
                        "authz_mode": str(settings.authz_mode),
                        "engines": dict(Counter(str(r.get("engine")) for r in records)),
                        "rounds": traffic.rounds,
                        "sent": traffic.sent,
                        "failures": traffic.failures,
                        "observed": [[*k, v] for k, v in sorted(observed.items())],
                        "expected": [[*k, v] for k, v in sorted(expected.items())],
                        "serials": {n: node.serials for n, node in mesh.nodes.items()},
                        "audit_url": mesh.audit_url,
                        "data_dir": str(data_dir),
                    },
                    indent=2,
                )
            )
        _step(f"the audit page: {mesh.audit_url}/")
        verdict = "every outcome as expected" if ok and rotated else "MISMATCHES above"
        _say(f"{verdict}; data and logs kept in {data_dir}")
        if settings.keep:
            _say("the mesh keeps running (--keep); Ctrl-C stops it")
            try:
                while mesh.up is not None and mesh.up.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0 if ok and rotated else 1
