"""Real meshward processes for end-to-end tests: free ports, the server, and CLI runs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.audit_trail import AuditTrail

__all__ = [
    "MESHWARD",
    "AgentProcess",
    "AuthzProcess",
    "CliResult",
    "ServerProcess",
    "agent_env",
    "cli_env",
    "free_port",
    "register",
    "run_cli",
    "running_agent",
    "running_audit",
    "running_authz",
    "running_server",
    "write_config",
]

# The console script installed next to the interpreter running the tests.
MESHWARD = Path(sys.executable).parent / "meshward"
# Deadlines only keep a broken run from hanging; no test asserts how long anything took.
READY_DEADLINE = 60.0
CLI_DEADLINE = 60.0
STOP_DEADLINE = 30.0


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive loopback ports nothing listens on right now."""
    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first, first + count):
                    sock = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except (OSError, OverflowError):
                continue
            return first
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without any MESHWARD_* variable (they would change the config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHWARD_")}
    env.update(extra)
    return env


def write_config(
    path: Path,
    *,
    health_port: int,
    node_ports: tuple[int, int] | None = None,
    audit_port: int | None = None,
    extra: str = "",
) -> Path:
    """Config with ports picked at run time; the node API and `up`'s audit API are off
    unless ``node_ports`` / ``audit_port`` are given, `up`'s authz and agent health always."""
    node = (
        f"  node_listen: 127.0.0.1:{node_ports[0]}\n  attestation_listen: 127.0.0.1:{node_ports[1]}\n"
        if node_ports
        else '  node_listen: ""\n'
    )
    audit = f"127.0.0.1:{audit_port}" if audit_port else '""'
    path.write_text(
        f"server:\n  health_listen: 127.0.0.1:{health_port}\n{node}audit:\n  listen: {audit}\n"
        # `up`'s authz child and agent health have fixed default ports; tests that want
        # them use tests/e2e/test_up.py's own config.
        f'authz:\n  listen: ""\nagent:\n  health_listen: ""\n{extra}'
    )
    return path


@dataclass(slots=True, frozen=True)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.returncode == 0, self.describe()
        return json.loads(self.stdout)

    def ok(self) -> CliResult:
        assert self.returncode == 0, self.describe()
        assert "Traceback" not in self.stderr, self.describe()
        return self

    def describe(self) -> str:
        return (
            f"meshward {' '.join(self.args)} exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def run_cli(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = CLI_DEADLINE
) -> CliResult:
    argv = tuple(str(a) for a in args)
    done = subprocess.run(
        [str(MESHWARD), *argv],
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(argv, done.returncode, done.stdout, done.stderr)


@dataclass
class ServerProcess:
    """A `meshward server`/`up` subprocess with its output in files (never a full pipe)."""

    args: tuple[str, ...]
    data_dir: Path
    health_port: int | None
    log_dir: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self, env: dict[str, str] | None = None) -> ServerProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (
            (self.log_dir / "stdout").open("wb") as out,
            (self.log_dir / "stderr").open("wb") as err,
        ):
            self.process = subprocess.Popen(
                [str(MESHWARD), *self.args],
                env=cli_env() if env is None else env,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text(errors="replace")

    @property
    def stdout(self) -> str:
        return (self.log_dir / "stdout").read_text(errors="replace")

    @property
    def health_url(self) -> str:
        assert self.health_port is not None
        return f"http://127.0.0.1:{self.health_port}"

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        """Poll /ready on the health port until it answers 200; fail with the server's stderr."""
        until = time.monotonic() + deadline
        last = "no answer yet"
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < until:
                code = self.process.poll()
                if code is not None:
                    pytest.fail(
                        f"meshward {' '.join(self.args)} exited {code} before it was ready\n"
                        f"--- stderr\n{self.stderr}"
                    )
                try:
                    response = client.get(f"{self.health_url}/ready")
                except httpx.TransportError as exc:
                    last = repr(exc)
                else:
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text}"
                time.sleep(0.05)
        self.kill()
        pytest.fail(
            f"meshward {' '.join(self.args)} was not ready within {deadline}s (last: {last})\n"
            f"--- stderr\n{self.stderr}"
        )

    def wait_exit(self, deadline: float = STOP_DEADLINE) -> int:
        try:
            return self.process.wait(timeout=deadline)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"meshward {' '.join(self.args)} did not exit\n--- stderr\n{self.stderr}")

    def terminate(self, deadline: float = STOP_DEADLINE) -> int:
        """SIGTERM, then wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(deadline)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_DEADLINE)


def server_args(
    command: str, data_dir: Path, config: Path | None, extra: Sequence[str | Path] = ()
) -> tuple[str, ...]:
    args: list[str] = [command, "--data-dir", str(data_dir)]
    if config is not None:
        args += ["--config", str(config)]
    return (*args, *(str(a) for a in extra))


@contextmanager
def running_server(
    root: Path,
    *,
    command: str = "up",
    extra: Sequence[str | Path] = (),
    env: dict[str, str] | None = None,
    node_ports: tuple[int, int] | None = None,
    audit_port: int | None = None,
) -> Iterator[ServerProcess]:
    """Start a server on ``root/data`` with a health port picked now; stop it at the end.

    Keep ``root`` short: the admin socket under it must fit in a Unix socket path.
    """
    port = free_port()
    config = write_config(
        root / "meshward.yaml", health_port=port, node_ports=node_ports, audit_port=audit_port
    )
    server = ServerProcess(
        args=server_args(command, root / "data", config, extra),
        data_dir=root / "data",
        health_port=port,
        log_dir=root / "logs",
    ).start(env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.terminate()


def agent_env(node_ports: tuple[int, int], **extra: str) -> dict[str, str]:
    """Environment pointing an agent at a server's node API and attestation ports.

    The agent's health listener gets a port picked now (its default is fixed, and two
    agents, or two test runs, would collide on it).
    """
    env = {
        "MESHWARD_AGENT__SERVER_ADDRESS": f"127.0.0.1:{node_ports[0]}",
        "MESHWARD_AGENT__ATTESTATION_ADDRESS": f"127.0.0.1:{node_ports[1]}",
        "MESHWARD_AGENT__HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
    }
    return cli_env(**{**env, **extra})


@dataclass
class AgentProcess(ServerProcess):
    """A `meshward agent` subprocess; ready once it says it serves workloads on its socket."""

    @property
    def socket(self) -> Path:
        return self.data_dir / "agent.sock"

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        until = time.monotonic() + deadline
        while time.monotonic() < until:
            code = self.process.poll()
            if code is not None:
                pytest.fail(
                    f"meshward {' '.join(self.args)} exited {code} before it was ready\n"
                    f"--- stderr\n{self.stderr}"
                )
            if "workloads on unix://" in self.stderr and self.socket.exists():
                return
            time.sleep(0.05)
        self.kill()
        pytest.fail(
            f"meshward {' '.join(self.args)} was not ready within {deadline}s\n"
            f"--- stderr\n{self.stderr}"
        )


@contextmanager
def running_agent(
    data_dir: Path,
    *,
    node_ports: tuple[int, int],
    extra: Sequence[str | Path] = (),
    env: Mapping[str, str] | None = None,
    log_dir: Path | None = None,
) -> Iterator[AgentProcess]:
    """Start `meshward agent` on ``data_dir`` against a server's node ports; stop it at the end.

    Keep ``data_dir`` short: the Workload API socket is ``data_dir/agent.sock``. ``env`` adds
    variables (e.g. MESHWARD_AGENT__X509POP__CERT_FILE); each start wants its own ``log_dir``
    when an agent is started twice on one data dir.
    """
    agent = AgentProcess(
        args=("agent", "--data-dir", str(data_dir), *(str(a) for a in extra)),
        data_dir=data_dir,
        health_port=None,
        log_dir=log_dir or data_dir.parent / f"{data_dir.name}-logs",
    )
    agent.start(agent_env(node_ports, **(env or {})))
    try:
        agent.wait_ready()
        yield agent
    finally:
        agent.terminate()


def register(server: ServerProcess, spiffe_id: str, uid: int, *, ttl: str = "20s") -> None:
    """An entry for ``spiffe_id``: any process of ``uid`` on the server's agent gets it."""
    run_cli(
        "entry",
        "create",
        "--spiffe-id",
        spiffe_id,
        "--selector",
        f"unix:uid:{uid}",
        "--x509-svid-ttl",
        ttl,
        "--data-dir",
        server.data_dir,
    ).ok()


@dataclass(frozen=True)
class AuthzProcess:
    """A `meshward authz` subprocess serving ``policies`` on ``port``."""

    port: int
    policies: Path  # holds istio/
    audit: AuditTrail  # the decision records, in the store its shipper fills
    log: Path
    process: subprocess.Popen[bytes]


@contextmanager
def running_authz(
    root: Path, policies: Mapping[str, str], *, env: Mapping[str, str] | None = None
) -> Iterator[AuthzProcess]:
    """`meshward authz` on ``root/policies``, whose ``istio/`` holds ``policies`` (name: YAML).

    Yields once a policy set is served; ``env`` adds variables (MESHWARD_AUTHZ__*).
    """
    istio = root / "policies" / "istio"
    istio.mkdir(parents=True)
    for name, text in policies.items():
        (istio / name).write_text(text)
    port = free_port()
    log = root / "authz.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(MESHWARD),
                "authz",
                "--policies",
                str(istio.parent),
                "--listen",
                f"127.0.0.1:{port}",
                "--trust-domain",
                "example.org",
                "--data-dir",
                str(root / "authz-data"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            # Its health port too is picked now: the default is fixed, and shared by every run.
            env=cli_env(MESHWARD_AUTHZ__HEALTH_LISTEN=f"127.0.0.1:{free_port()}", **(env or {})),
        )
    try:
        deadline = time.monotonic() + 20
        while "serving policy set" not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield AuthzProcess(port, istio.parent, AuditTrail(root / "authz-data"), log, process)
    finally:
        process.terminate()
        assert process.wait(20) == 0, log.read_text()


@dataclass(frozen=True)
class AuditProcess:
    """A `meshward audit` subprocess: the query API and page on ``url``."""

    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def get(self, path: str, **params: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", params=params, timeout=30)


@contextmanager
def running_audit(
    data_dir: Path,
    log: Path,
    *,
    extra: Sequence[str | Path] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[AuditProcess]:
    """`meshward audit` on ``data_dir``'s store, on a port picked now; ready once /ready is 200."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(MESHWARD),
                "audit",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{port}",
                *(str(a) for a in extra),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(**(env or {})),
        )
    audit = AuditProcess(f"http://127.0.0.1:{port}", log, process)
    try:
        deadline = time.monotonic() + READY_DEADLINE
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{audit.url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield audit
    finally:
        process.terminate()
        assert process.wait(STOP_DEADLINE) == 0, log.read_text()
