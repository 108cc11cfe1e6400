"""The spool and shipper under faults, with real processes and real databases.

- SIGKILL of the authz process and of its shipper child at random points of a steady
  stream of Check calls, on SQLite and PostgreSQL: every decision a client got an
  answer for is stored, and none twice.
- The database unreachable for a while under load (the shipper points at a port that
  refuses, which later forwards to the real PostgreSQL): nothing lost, the spool
  drains once it is back.
- The spool full, with each ``audit.on_full``: ``deny`` denies what it cannot record
  (``audit_unavailable``) and says so in /ready; ``allow`` serves and counts what it
  lost.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from audit.store.database import AuditDatabase
from tests.e2e.checks import ALLOW_GET, PRODUCTPAGE, check, decision_id
from tests.e2e.processes import MESHWARD, cli_env, free_port

DEADLINE = 60.0  # only keeps a broken run from hanging; nothing asserts durations


@dataclass
class Authz:
    """`meshward authz` on one data dir and port, started, killed and started again."""

    root: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        policies = self.root / "policies"
        (policies / "istio").mkdir(parents=True, exist_ok=True)
        (policies / "istio" / "reviews.yaml").write_text(ALLOW_GET)
        self.starts += 1
        log = (self.root / f"authz-{self.starts}.log").open("wb")
        with log:
            self.process = subprocess.Popen(
                [
                    str(MESHWARD),
                    "authz",
                    "--policies",
                    str(policies),
                    "--listen",
                    f"127.0.0.1:{self.port}",
                    "--trust-domain",
                    "example.org",
                    "--data-dir",
                    str(self.root / "data"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=cli_env(
                    MESHWARD_AUTHZ__HEALTH_LISTEN=f"127.0.0.1:{self.health_port}",
                    **self.env,
                ),
            )
        self.wait_serving()

    def logs(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-3000:] for p in sorted(self.root.glob("authz-*.log"))
        )

    def wait_serving(self) -> None:
        deadline = time.monotonic() + DEADLINE
        assert self.process is not None
        while True:
            assert self.process.poll() is None, self.logs()
            if "serving policy set" in (self.root / f"authz-{self.starts}.log").read_text():
                return
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.05)

    @property
    def shipper_pids(self) -> list[int]:
        """The authz process's children (its shipper)."""
        assert self.process is not None
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == self.process.pid and fields[0] != "Z":
                    found.append(int(entry))
        return found

    def kill_shipper(self) -> bool:
        pids = self.shipper_pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return bool(pids)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(DEADLINE)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            assert self.process.wait(DEADLINE) == 0, self.logs()

    def ready(self) -> tuple[int, dict[str, Any]]:
        response = httpx.get(f"http://127.0.0.1:{self.health_port}/ready", timeout=5)
        return response.status_code, response.json()

    def metric(self, name: str, **labels: str) -> float:
        body = httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5).text
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return sample.value
        return 0.0


@dataclass
class Traffic:
    """Check calls in a thread; the decision ids of every answer, allowed or denied."""

    port: int
    answered: dict[str, bool] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(DEADLINE)

    def _run(self) -> None:
        requests = [check(PRODUCTPAGE, "GET", "/reviews/1"), check(PRODUCTPAGE, "DELETE", "/x")]
        n = 0
        while not self._stop.is_set():
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                while not self._stop.is_set():
                    try:
                        response = stub.Check(requests[n % 2], timeout=2)
                    except grpc.RpcError:
                        self.errors += 1  # authz is down: try again, on a new channel
                        self._stop.wait(0.05)
                        break
                    n += 1
                    self.answered[decision_id(response)] = response.status.code == 0

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + DEADLINE
        target = len(self.answered) + count
        while len(self.answered) < target:
            assert time.monotonic() < deadline, f"{len(self.answered)} answers"
            time.sleep(0.02)


def stored(url: str) -> tuple[set[str], int]:
    """The stored decision ids, and the row count (equal sizes: no duplicate)."""
    db = AuditDatabase(url, read_only=True)
    try:
        with db.engine.connect() as conn:
            ids = list(conn.execute(text("SELECT decision_id FROM decisions")).scalars())
    finally:
        db.dispose()
    return set(ids), len(ids)


def wait_stored(url: str, wanted: set[str], authz: Authz) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        with contextlib.suppress(Exception):
            ids, _ = stored(url)
            if wanted <= ids:
                return
        assert time.monotonic() < deadline, (
            f"{len(wanted - stored(url)[0])} of {len(wanted)} answered decisions never "
            f"stored\n{authz.logs()}"
        )
        time.sleep(0.1)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


def test_sigkill_of_authz_and_shipper_loses_and_duplicates_nothing(
    root: Path, database_url: str
) -> None:
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    authz = Authz(
        root,
        {
            "MESHWARD_AUDIT__DATABASE_URL": database_url,
            # Small segments: kills land in the middle of segments and across them.
            "MESHWARD_AUDIT__SPOOL__SEGMENT_BYTES": "64KiB",
        },
    )
    authz.start()
    kills = {"authz": 0, "shipper": 0}
    victims = ["authz", "shipper"] * 3
    rng.shuffle(victims)
    try:
        with Traffic(authz.port) as traffic:
            for victim in victims:
                traffic.wait_for(rng.randrange(100, 600))
                if victim == "shipper":
                    kills["shipper"] += authz.kill_shipper()  # none while it is restarted
                else:
                    authz.kill()
                    kills["authz"] += 1
                    authz.start()
            traffic.wait_for(200)
        assert kills["shipper"] > 0, kills
    finally:
        authz.stop()
    answered = set(traffic.answered)
    wait_stored(database_url, answered, authz)
    ids, rows = stored(database_url)
    assert rows == len(ids), f"duplicates (seed {seed})"
    assert answered <= ids, f"lost {len(answered - ids)} (seed {seed}, kills {kills})"
    # Decisions may be stored that no client saw answered: the one in flight when authz
    # was killed, or one whose answer came after the client gave up.
    assert len(ids - answered) <= kills["authz"] + traffic.errors, (seed, kills)


class Forwarder:
    """A TCP port that refuses until ``open()``, then forwards to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            thread = threading.Thread(target=self._pipe, args=(client, upstream), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        with a, b, contextlib.suppress(OSError):  # either side hung up
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for source in readable:
                    data = source.recv(65536)
                    if not data:
                        return
                    (b if source is a else a).sendall(data)

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        for thread in self._threads:
            thread.join(5)


@contextlib.contextmanager
def database_behind(postgres_url: str) -> Iterator[tuple[Forwarder, str]]:
    """A refusing port in front of the test database; the URL the shipper gets."""
    forwarder = Forwarder(("127.0.0.1", 5432))
    base, _, name = postgres_url.rpartition("/")
    # The database is created here: the shipper migrates it once it can reach it.
    try:
        yield forwarder, f"{base.rsplit('@', 1)[0]}@127.0.0.1:{forwarder.port}/{name}"
    finally:
        forwarder.close()


@pytest.mark.postgres
def test_a_database_down_under_load_loses_nothing_and_the_spool_drains_after(
    root: Path, postgres_url: str
) -> None:
    with database_behind(postgres_url) as (forwarder, url):
        authz = Authz(root, {"MESHWARD_AUDIT__DATABASE_URL": url})
        authz.start()
        try:
            with Traffic(authz.port) as traffic:
                traffic.wait_for(1500)
                deadline = time.monotonic() + DEADLINE
                while not authz.ready()[1]["audit"]["shipper"]["last_error"]:
                    assert time.monotonic() < deadline, authz.logs()
                    time.sleep(0.1)
                code, ready = authz.ready()
                audit = ready["audit"]
                assert code == 200, ready  # serving: the spool holds what cannot be shipped
                assert audit["pending_bytes"] > 0, audit
                assert "Connection refused" in audit["shipper"]["last_error"], audit
                assert authz.metric("meshward_audit_shipper_failing") == 1
                traffic.wait_for(500)  # still deciding while the database is away
                forwarder.open()  # the database is back
                traffic.wait_for(500)
            wait_stored(postgres_url, set(traffic.answered), authz)
            deadline = time.monotonic() + DEADLINE
            while authz.ready()[1]["audit"]["pending_bytes"] > 0:
                assert time.monotonic() < deadline, authz.ready()
                time.sleep(0.1)
            assert authz.ready()[1]["audit"]["shipper"]["last_error"] is None
        finally:
            authz.stop()
    ids, rows = stored(postgres_url)
    assert rows == len(ids)
    assert set(traffic.answered) <= ids


FULL_SPOOL = {
    "MESHWARD_AUDIT__SPOOL__MAX_BYTES": "128KiB",
    "MESHWARD_AUDIT__SPOOL__SEGMENT_BYTES": "64KiB",
}


@pytest.mark.postgres
def test_a_full_spool_with_on_full_deny_denies_what_it_cannot_record(
    root: Path, postgres_url: str
) -> None:
    with database_behind(postgres_url) as (forwarder, url):
        authz = Authz(root, {"MESHWARD_AUDIT__DATABASE_URL": url, **FULL_SPOOL})
        authz.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{authz.port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                allowed: set[str] = set()
                for _ in range(5000):
                    response = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/1"), timeout=5)
                    if response.status.code != 0:
                        break
                    allowed.add(decision_id(response))
                else:
                    pytest.fail("the spool never filled")
                assert response.denied_response.status.code == 403
                assert (
                    authz.metric(
                        "meshward_authz_decisions_total", result="deny", reason="audit_unavailable"
                    )
                    == 1
                )
                code, ready = authz.ready()
                assert code == 503
                assert "every request is denied" in ready["audit"]["full"]
                forwarder.open()
                wait_stored(postgres_url, allowed, authz)
                # Drained: room again, and requests are allowed (and recorded) again.
                deadline = time.monotonic() + DEADLINE
                while True:
                    response = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/1"), timeout=5)
                    if response.status.code == 0:
                        break
                    assert time.monotonic() < deadline, authz.ready()
                    time.sleep(0.2)
                again = decision_id(response)
            assert authz.ready()[0] == 200
        finally:
            authz.stop()
    wait_stored(postgres_url, {again}, authz)


@pytest.mark.postgres
def test_a_full_spool_with_on_full_allow_serves_and_counts_what_it_lost(
    root: Path, postgres_url: str
) -> None:
    with database_behind(postgres_url) as (_, url):
        authz = Authz(
            root,
            {"MESHWARD_AUDIT__DATABASE_URL": url, "MESHWARD_AUDIT__ON_FULL": "allow", **FULL_SPOOL},
        )
        authz.start()
        try:
            with grpc.insecure_channel(f"127.0.0.1:{authz.port}") as channel:
                stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                for _ in range(400):
                    response = stub.Check(check(PRODUCTPAGE, "GET", "/reviews/1"), timeout=5)
                    assert response.status.code == 0, "on_full: allow never denies for audit"
            lost = authz.metric("meshward_audit_records_lost_total")
            code, ready = authz.ready()
            assert code == 200, ready
            assert ready["audit"]["records_lost"] == lost > 0
            assert "records are being lost" in ready["audit"]["full"]
            written = authz.metric("meshward_audit_records_written_total")
            assert written + lost == 400
        finally:
            authz.stop()
