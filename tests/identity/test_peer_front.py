"""PeerFront in front of a real grpcio server: each call knows the process that made it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest

from identity.peer_front import MAX_CONNECTIONS_PER_UID, PeerFront
from identity.peers import Peer, process_start_time

METHOD = "/meshward.test.Who/Am"

# A client in another process: connect through the front and hold the connection open
# until told to go. /usr/bin/python3 because the test's own interpreter may live where
# another user cannot read it.
OTHER_PYTHON = Path("/usr/bin/python3")
HOLDER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
"""


class Stack:
    def __init__(self, root: Path, *, max_per_uid: int = MAX_CONNECTIONS_PER_UID) -> None:
        private = root / "private"
        private.mkdir(mode=0o700)
        self.inner = private / "grpc.sock"
        self.listen = root / "agent.sock"
        self.tag_dir = private / "peers"
        self.front = PeerFront(
            listen=self.listen, upstream=self.inner, tag_dir=self.tag_dir, max_per_uid=max_per_uid
        )
        self.server = grpc.server(ThreadPoolExecutor(4))
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "meshward.test.Who", {"Am": grpc.unary_unary_rpc_method_handler(self._who)}
                )
            ]
        )
        self.server.add_insecure_port(f"unix:{self.inner}")
        self.server.start()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.front.start(), self.loop).result(5)

    def _who(self, _request: bytes, context: grpc.ServicerContext) -> bytes:
        peer = self.front.lookup(context.peer())
        return json.dumps(None if peer is None else asdict(peer)).encode()

    def call(self, path: Path) -> dict[str, int] | None:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            return json.loads(channel.unary_unary(METHOD)(b"", timeout=10))  # type: ignore[no-any-return]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.front.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.server.stop(None)


@pytest.fixture
def stack() -> Iterator[Stack]:
    # Not tmp_path: pytest's base directory is private to root, and the agent socket
    # must be reachable by workloads running as other users.
    root = Path(tempfile.mkdtemp(prefix="meshward-front-"))
    root.chmod(0o755)
    s = Stack(root)
    yield s
    s.close()
    shutil.rmtree(root)


def test_call_through_the_front_knows_the_caller(stack: Stack) -> None:
    seen = stack.call(stack.listen)
    assert seen == {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "start_time": process_start_time(os.getpid()),
    }


def test_call_that_bypasses_the_front_has_no_identity(stack: Stack) -> None:
    assert stack.call(stack.inner) is None


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the client as another user")
@pytest.mark.skipif(not OTHER_PYTHON.exists(), reason=f"{OTHER_PYTHON} is not installed")
def test_caller_in_another_process_as_another_user(stack: Stack) -> None:
    proc = subprocess.Popen(
        [str(OTHER_PYTHON), "-c", HOLDER, str(stack.listen)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        user=65534,
        group=65534,
        extra_groups=[],
        cwd="/",
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "connected\n"
        deadline = time.monotonic() + 10
        seen: list[Peer] = []
        # The tag socket is bound a moment before its peer is recorded (both before the
        # relay connects upstream, so no call can arrive in between): wait for the record.
        while not seen and time.monotonic() < deadline:
            tags = list(stack.tag_dir.iterdir())
            seen = [p for tag in tags if (p := stack.front.lookup(f"unix:{tag}")) is not None]
            time.sleep(0.02)
        assert len(seen) == 1
        peer = seen[0]
        assert (peer.pid, peer.uid, peer.gid) == (proc.pid, 65534, 65534)
        assert peer.start_time == process_start_time(proc.pid)
    finally:
        proc.communicate("bye\n", timeout=10)


def test_socket_modes_and_cleanup(stack: Stack) -> None:
    assert stat.S_IMODE(stack.listen.stat().st_mode) == 0o666
    assert stat.S_IMODE(stack.tag_dir.stat().st_mode) == 0o700
    stack.call(stack.listen)
    deadline = time.monotonic() + 10
    while (
        stack.front.connections or list(stack.tag_dir.iterdir())
    ) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stack.front.connections == 0
    assert list(stack.tag_dir.iterdir()) == []


def test_a_uid_holds_at_most_its_limit_of_connections() -> None:
    root = Path(tempfile.mkdtemp(prefix="meshward-front-"))
    root.chmod(0o755)
    stack = Stack(root, max_per_uid=3)
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            held.append(socket.socket(socket.AF_UNIX))
            held[-1].connect(str(stack.listen))
        deadline = time.monotonic() + 10
        while stack.front.connections < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stack.front.connections == 3
        # The fourth is closed at once: a call over it fails, nothing is relayed.
        with pytest.raises(grpc.RpcError):
            stack.call(stack.listen)
        assert stack.front.refused == 1
        # One closed, one more may come: the limit is on connections held, not made.
        held.pop().close()
        while stack.front.connections > 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stack.call(stack.listen) is not None
    finally:
        for s in held:
            s.close()
        stack.close()
        shutil.rmtree(root)
