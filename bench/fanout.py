"""Rotation fan-out: N Workload API (or SDS) streams on one agent, then one new SVID.

An in-process server + agent (CA on SQLite in a temporary directory, IdentityAdmin,
LocalBackend, Agent, WorkloadCache, AgentEndpoints with the unix attestor) runs on an
asyncio loop in a background thread of this process. N streams are opened from separate
client processes (``--clients``), one connection each, so that client CPU is not counted
against the agent. Once every stream holds its first SVID, the entry's DNS names are
changed through IdentityAdmin: the agent sees the new revision on its next sync tick,
re-signs that entry at once, and every stream must receive a certificate with a new
serial. Printed per N and round, all measured in this one run:

- change -> first / last stream holding the new SVID (and the spread between the two),
- the agent process's CPU seconds per 1000 stream updates (getrusage of this process:
  the event-loop thread, gRPC's core threads and worker threads; no client work),
- the agent's CPU while idle with N streams open (the sync loop ticks every --interval).

    .venv/bin/python bench/fanout.py [--streams 100 1000] [--sds] [--clients 4] [--rounds 3]

The agent socket is served through PeerFront (identity/peer_front.py): each stream is
two connections on the agent side (workload -> front, front -> gRPC server), i.e. three
file descriptors in this process, and every byte of every push is copied through the
front's asyncio pumps. The file-descriptor limit is raised to fit.

``--sds`` runs the same with Envoy SDS ``StreamSecrets`` streams requesting ``default``
(identity/sds.py), each client ACKing every response as Envoy does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import os
import pstats
import queue
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry
from spiffe import TrustDomain
from spiffe._proto import workload_pb2, workload_pb2_grpc

from identity.admin import IdentityAdmin
from identity.agent import Agent
from identity.agent_endpoints import AgentEndpoints
from identity.authority import CASettings, CertificateAuthority
from identity.entries import Entry, EntrySpec
from identity.local_backend import LocalBackend
from identity.metrics import IdentityMetrics
from identity.selectors import Selector
from identity.store.database import Database, sqlite_url
from identity.unix_attestor import UnixAttestor
from identity.workload_cache import WorkloadCache

T = TypeVar("T")
TRUST_DOMAIN = "example.org"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/meshward/agent/local"
WORKLOAD_ID = f"spiffe://{TRUST_DOMAIN}/bench/fanout"
SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CHANGE = "IdentityAdmin.update_entry(dns_names=...) -> agent re-signs on its next sync tick"


def utcnow() -> datetime:
    return datetime.now(UTC)


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the agent side (this process) --------------------------------------------------------


class Stack:
    """CA + admin + LocalBackend + Agent + cache + agent socket, on a loop in a thread."""

    def __init__(self, root: Path, *, interval: float) -> None:
        self.root = root
        self.socket = root / "agent.sock"
        self.db = Database(sqlite_url(root))
        self.db.migrate()
        self.ca = CertificateAuthority(
            db=self.db,
            trust_domain=TrustDomain(TRUST_DOMAIN),
            key_dir=root / "keys",
            settings=CASettings(),
            metrics=IdentityMetrics(CollectorRegistry()),
        )
        self.ca.load(utcnow())
        self.admin = IdentityAdmin(db=self.db, ca=self.ca, default_parent_id=AGENT_ID, clock=utcnow)
        self.cache = WorkloadCache(self.ca.bundle)
        self.agent = Agent(
            backend=LocalBackend(admin=self.admin, agent_id=AGENT_ID, clock=utcnow),
            cache=self.cache,
            clock=utcnow,
            interval=interval,
        )
        self.endpoints = AgentEndpoints(
            socket=self.socket,
            private_dir=root / "private",
            attestors=[UnixAttestor()],
            source=self.cache,
            sign_jwt=self.agent.sign_jwt_svid,
            # The bench's N workloads are one uid's N connections.
            max_connections_per_uid=1_000_000,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.agent.sync())
        self.run(self.endpoints.start())
        self._agent_task = asyncio.run_coroutine_threadsafe(self.agent.run(), self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the agent's loop (the loop owns the cache)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def loop_thread_cpu(self) -> float:
        assert self.thread.ident is not None
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def current_serial(self, selectors: frozenset[Selector]) -> int | None:
        view = self.call(lambda: self.cache.view(selectors, version=0))
        return view.svids[0].leaf.serial_number if view.svids else None

    def close(self) -> None:
        self._agent_task.cancel()
        with contextlib.suppress(Exception):
            self.run(self.endpoints.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.ca.close()
        self.db.dispose()


@dataclass(slots=True)
class Client:
    """One client process and what it has reported (JSON lines on its stdout)."""

    proc: subprocess.Popen[str]
    streams: int
    stderr: Path
    done: dict[int, dict[str, Any]] = field(default_factory=dict)  # generation -> report
    progress: dict[int, int] = field(default_factory=dict)  # generation -> streams there
    messages: int = 0
    error: str | None = None


class Clients:
    def __init__(self, socket: Path, streams: int, processes: int, args: argparse.Namespace):
        self._events: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
        self.streams = streams
        self.clients: list[Client] = []
        shares = [streams // processes + (i < streams % processes) for i in range(processes)]
        for i, share in enumerate(s for s in shares if s):
            stderr = socket.parent / f"client-{i}.err"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--client",
                    str(socket),
                    "--client-streams",
                    str(share),
                    "--client-deadline",
                    str(args.timeout * (args.rounds + 3)),
                    "--open-batch",
                    str(args.open_batch),
                    *(["--sds"] if args.sds else []),
                    *(["--burst"] if args.burst else []),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr.open("w"),
                text=True,
            )
            self.clients.append(Client(proc=proc, streams=share, stderr=stderr))
            threading.Thread(target=self._read, args=(i, proc), daemon=True).start()

    def _read(self, index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._events.put((index, json.loads(line)))
        self._events.put((index, None))

    def reached(self, generation: int) -> int:
        return sum(
            c.streams if generation in c.done else c.progress.get(generation, 0)
            for c in self.clients
        )

    def wait(self, generation: int, timeout: float) -> list[dict[str, Any]]:
        """Every client's report for ``generation``; raises TimeoutError or RuntimeError."""
        deadline = time.monotonic() + timeout
        while not all(generation in c.done for c in self.clients):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"only {self.reached(generation)}/{self.streams} streams reached SVID "
                    f"generation {generation} within {timeout:g}s"
                )
            try:
                index, event = self._events.get(timeout=left)
            except queue.Empty:
                continue
            client = self.clients[index]
            if event is None:
                tail = client.stderr.read_text()[-2000:]
                raise RuntimeError(f"client process {index} exited early:\n{tail}")
            if "error" in event:
                raise RuntimeError(f"client process {index}: {event['error']}")
            client.messages = event.get("messages", client.messages)
            if "gen" in event:
                client.done[event["gen"]] = event
            else:
                client.progress = {int(g): n for g, n in event["progress"].items()}
        return [c.done[generation] for c in self.clients]

    @property
    def messages(self) -> int:
        return sum(c.messages for c in self.clients)

    def close(self) -> None:
        for client in self.clients:
            with contextlib.suppress(OSError):
                assert client.proc.stdin is not None
                client.proc.stdin.close()
        for client in self.clients:
            try:
                client.proc.wait(10)
            except subprocess.TimeoutExpired:
                client.proc.kill()
                client.proc.wait()


@dataclass(slots=True, frozen=True)
class Round:
    first: float  # change -> first stream with the new SVID, seconds
    last: float  # change -> last stream with the new SVID
    cpu: float  # agent process CPU seconds from the change until the last stream had it
    loop_cpu: float  # of which the event-loop thread
    wall: float  # the window ``cpu`` was measured over
    updates: int  # messages the clients received in the window


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.01)


def idle_cpu(stack: Stack, seconds: float) -> float:
    """Agent CPU (fraction of one core) over ``seconds`` with nothing changing."""
    cpu, started = process_cpu(), time.monotonic()
    time.sleep(seconds)
    return (process_cpu() - cpu) / (time.monotonic() - started)


def run_n(n: int, args: argparse.Namespace) -> bool:
    kind = "SDS StreamSecrets ('default')" if args.sds else "Workload API FetchX509SVID"
    print(f"\n== N = {n} {kind} streams, {args.clients} client processes ==")
    with tempfile.TemporaryDirectory(prefix="meshward-fanout-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        stack = Stack(root, interval=args.interval)
        clients: Clients | None = None
        profiler = cProfile.Profile() if args.profile else None
        try:
            selectors = frozenset({Selector("unix", "uid", str(os.getuid()))})
            idle_empty = idle_cpu(stack, args.idle)
            entry: Entry = stack.admin.create_entry(
                EntrySpec(
                    spiffe_id=WORKLOAD_ID, parent_id="", selectors=(f"unix:uid:{os.getuid()}",)
                )
            )
            wait_for(
                lambda: stack.current_serial(selectors) is not None, args.timeout, "first SVID"
            )

            opened = time.monotonic()
            clients = Clients(stack.socket, n, min(args.clients, n), args)
            reports = clients.wait(0, args.timeout)
            open_seconds = time.monotonic() - opened
            serial = stack.current_serial(selectors)
            held = {s for r in reports for s in r["serials"]}
            if held != {f"{serial:x}"}:
                print(f"FAILED: streams hold serials {held}, the agent holds {serial:x}")
                return False
            wait_for(lambda: stack.call(lambda: stack.cache.subscribers) >= n, 10, "subscriptions")
            connections = stack.call(lambda: stack.endpoints.front.connections)
            print(
                f"all {n} streams hold their first SVID after {open_seconds:.2f}s "
                f"({connections} PeerFront connections, {stack.cache.subscribers} subscriptions)"
            )
            idle_open = idle_cpu(stack, args.idle)
            print(
                f"agent CPU while idle, sync tick every {args.interval:g}s: "
                f"{idle_empty * 100:.1f}% of a core with 0 streams, "
                f"{idle_open * 100:.1f}% with {n} streams open"
            )

            print(f"change: {CHANGE}")
            rounds: list[Round] = []
            for generation in range(1, args.rounds + 1):
                before = stack.current_serial(selectors)
                messages = clients.messages
                if profiler is not None:
                    stack.call(profiler.enable)
                cpu, loop_cpu = process_cpu(), stack.loop_thread_cpu()
                changed_at = time.monotonic()
                stack.admin.update_entry(
                    entry.id, {"dns_names": (f"r{generation}.fanout.{TRUST_DOMAIN}",)}
                )
                try:
                    reports = clients.wait(generation, args.timeout)
                except TimeoutError as exc:
                    print(
                        f"FAILED: {exc} (the agent holds serial {stack.current_serial(selectors)})"
                    )
                    return False
                finally:
                    if profiler is not None:
                        stack.call(profiler.disable)
                cpu_end, loop_end, wall = (
                    process_cpu(),
                    stack.loop_thread_cpu(),
                    time.monotonic() - changed_at,
                )
                after = stack.current_serial(selectors)
                held = {s for r in reports for s in r["serials"]}
                if after == before or held != {f"{after:x}"}:
                    print(f"FAILED: streams hold {held}; agent had {before:x}, now {after:x}")
                    return False
                rounds.append(
                    Round(
                        first=min(r["first"] for r in reports) - changed_at,
                        last=max(r["last"] for r in reports) - changed_at,
                        cpu=cpu_end - cpu,
                        loop_cpu=loop_end - loop_cpu,
                        wall=wall,
                        updates=clients.messages - messages,
                    )
                )
                r = rounds[-1]
                print(
                    f"round {generation}: new serial {after:x} on all {n} streams; "
                    f"change->first {r.first * 1000:7.1f} ms, change->last {r.last * 1000:7.1f} ms, "
                    f"spread {(r.last - r.first) * 1000:7.1f} ms; agent CPU {r.cpu:.3f}s "
                    f"(loop thread {r.loop_cpu:.3f}s) for {r.updates} updates"
                )
                # Let late pushes land, and change at a random phase of the agent's sync tick.
                time.sleep(args.interval * (1 + random.random()))

            per_k = [r.cpu / r.updates * 1000 for r in rounds]
            idle_share = [idle_open * r.wall for r in rounds]
            net_k = [
                (r.cpu - i) / r.updates * 1000 for r, i in zip(rounds, idle_share, strict=True)
            ]
            print(f"-- N = {n}, median of {len(rounds)} rounds --")
            print(
                f"change -> last stream has the new SVID : {_median_ms([r.last for r in rounds])}"
            )
            print(
                f"change -> first stream                 : {_median_ms([r.first for r in rounds])}"
            )
            print(
                "fan-out spread (first -> last stream)  : "
                f"{_median_ms([r.last - r.first for r in rounds])}"
            )
            print(f"agent CPU s per 1000 stream updates    : {statistics.median(per_k):.3f}")
            print(
                "  minus idle sync-loop CPU in the window: "
                f"{statistics.median(net_k):.3f}  (loop thread share "
                f"{statistics.median([r.loop_cpu / r.cpu for r in rounds]) * 100:.0f}%)"
            )
            extra = sum(r.updates for r in rounds) - n * len(rounds)
            if extra:
                print(f"note: {extra} messages beyond one per stream per round")
            if profiler is not None:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
                print("-- event-loop thread profile over all rounds (tottime) --")
                print(out.getvalue())
            return True
        except (TimeoutError, RuntimeError) as exc:
            print(f"FAILED: {exc}")
            return False
        finally:
            if clients is not None:
                clients.close()
            stack.close()


def _median_ms(values: list[float]) -> str:
    return (
        f"{statistics.median(values) * 1000:8.1f} ms  (rounds: "
        + ", ".join(f"{v * 1000:.1f}" for v in values)
        + ")"
    )


# -- the client side (separate processes) -------------------------------------------------


def _leaf_der(blob: bytes) -> bytes:
    """The first certificate of concatenated DER (the Workload API's leaf-first chain)."""
    length = blob[1]
    header = 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(blob[2 : 2 + size], "big")
        header += size
    return blob[: header + length]


class Tally:
    """Per-stream serials; reports to the parent when every stream reaches a generation."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.serial: list[int | None] = [None] * streams
        self.generation = [-1] * streams
        self.reached: dict[int, int] = {}
        self.window: dict[int, list[float]] = {}
        self.serials: dict[int, set[int]] = {}
        self.messages = 0
        self.reported = ""

    def seen(self, stream: int, serial: int, at: float) -> None:
        self.messages += 1
        if serial == self.serial[stream]:
            return
        self.serial[stream] = serial
        self.generation[stream] += 1
        g = self.generation[stream]
        self.reached[g] = self.reached.get(g, 0) + 1
        window = self.window.setdefault(g, [at, at])
        window[0], window[1] = min(window[0], at), max(window[1], at)
        self.serials.setdefault(g, set()).add(serial)
        if self.reached[g] == self.streams:
            emit(
                {
                    "gen": g,
                    "first": window[0],
                    "last": window[1],
                    "serials": sorted(f"{s:x}" for s in self.serials[g]),
                    "messages": self.messages,
                }
            )

    def progress(self) -> None:
        state = json.dumps(self.reached, sort_keys=True) + str(self.messages)
        if state != self.reported:
            self.reported = state
            emit({"progress": self.reached, "messages": self.messages})


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _channel(socket: str) -> grpc.aio.Channel:
    # A local subchannel pool: one connection per stream, as N workloads would have.
    return grpc.aio.insecure_channel(
        f"unix:{socket}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def _workload_stream(socket: str, index: int, tally: Tally, opening: Opening) -> None:
    async with _channel(socket) as channel:
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        call = stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(),
            metadata=(("workload.spiffe.io", "true"),),
            wait_for_ready=opening.wait_for_ready,
        )
        async for response in call:
            at = time.monotonic()
            leaf = x509.load_der_x509_certificate(_leaf_der(response.svids[0].x509_svid))
            tally.seen(index, leaf.serial_number, at)
            opening.opened(index)


async def _sds_stream(socket: str, index: int, tally: Tally, opening: Opening) -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.extensions.transport_sockets.tls.v3 import (
        secret_pb2,
    )
    from envoy.service.discovery.v3 import discovery_pb2
    from envoy.service.secret.v3 import sds_pb2_grpc

    requests: asyncio.Queue[Any] = asyncio.Queue()

    async def outgoing() -> Any:
        while (request := await requests.get()) is not None:
            yield request

    async with _channel(socket) as channel:
        call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(
            outgoing(), wait_for_ready=opening.wait_for_ready
        )
        requests.put_nowait(
            discovery_pb2.DiscoveryRequest(
                type_url=SECRET_TYPE_URL,
                resource_names=["default"],
                node=base_pb2.Node(id=f"bench-{os.getpid()}-{index}", cluster="bench"),
            )
        )
        async for response in call:
            at = time.monotonic()
            secret = secret_pb2.Secret()
            response.resources[0].Unpack(secret)
            chain = secret.tls_certificate.certificate_chain.inline_bytes
            tally.seen(index, x509.load_pem_x509_certificates(chain)[0].serial_number, at)
            opening.opened(index)
            requests.put_nowait(  # ACK, as Envoy does
                discovery_pb2.DiscoveryRequest(
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=["default"],
                    type_url=SECRET_TYPE_URL,
                )
            )


class Opening:
    """Limits how many streams of this process are connecting at once.

    PeerFront listens with asyncio's default backlog of 100: connections beyond it, made
    while the agent's loop is busy, are refused with EAGAIN and gRPC fails the call
    UNAVAILABLE. ``--burst`` opens everything at once to show that; by default each
    client process has at most ``limit`` streams waiting for their first SVID, and
    retries a refused connection (wait_for_ready) like a real workload would.
    """

    def __init__(self, limit: int, *, burst: bool) -> None:
        self.wait_for_ready = not burst
        self._slots = asyncio.Semaphore(limit)
        self._waiting: set[int] = set()

    async def start(self, index: int) -> None:
        await self._slots.acquire()
        self._waiting.add(index)

    def opened(self, index: int) -> None:
        if index in self._waiting:
            self._waiting.discard(index)
            self._slots.release()


async def _client(
    socket: str, streams: int, sds: bool, deadline: float, burst: bool, batch: int
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # The parent closes our stdin when it is done with us.
    threading.Thread(
        target=lambda: (sys.stdin.read(), loop.call_soon_threadsafe(stop.set)), daemon=True
    ).start()
    tally = Tally(streams)
    stream = _sds_stream if sds else _workload_stream
    opening = Opening(streams if burst else batch, burst=burst)

    async def guarded(index: int) -> None:
        try:
            await opening.start(index)
            await stream(socket, index, tally, opening)
        except grpc.aio.AioRpcError as exc:
            emit({"error": f"stream {index}: {exc.code().name}: {exc.details()}"})
        except Exception as exc:
            emit({"error": f"stream {index}: {type(exc).__name__}: {exc}"})
        else:
            emit({"error": f"stream {index}: the agent ended the stream"})

    tasks = [asyncio.create_task(guarded(i)) for i in range(streams)]

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            tally.progress()

    reporter = asyncio.create_task(report())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), deadline)
    reporter.cancel()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, reporter, return_exceptions=True)


# -- entry point ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[100, 1000], metavar="N")
    parser.add_argument("--sds", action="store_true", help="SDS StreamSecrets instead")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--rounds", type=int, default=3, help="rotations per N")
    parser.add_argument("--interval", type=float, default=0.5, help="agent sync tick, s")
    parser.add_argument("--idle", type=float, default=3.0, help="idle CPU sample, s")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound on every wait, s")
    parser.add_argument("--profile", action="store_true", help="profile the loop thread")
    parser.add_argument(
        "--open-batch", type=int, default=20, help="streams connecting at once per client"
    )
    parser.add_argument(
        "--burst", action="store_true", help="open all streams at once, no retry (see Opening)"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--client-streams", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:
        raise_fd_limit(args.client_streams + 256)
        asyncio.run(
            _client(
                args.client,
                args.client_streams,
                args.sds,
                args.client_deadline,
                args.burst,
                args.open_batch,
            )
        )
        return

    # Agent side: 3 fds per stream (front accept + front->server + server accept) + slack.
    limit = raise_fd_limit(3 * max(args.streams) + 512)
    print(f"agent process: pid {os.getpid()}, RLIMIT_NOFILE {limit}, {os.cpu_count()} CPUs")
    ok = all([run_n(n, args) for n in args.streams])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
