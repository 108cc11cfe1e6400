"""An in-process server + agent for tests: CA, admin, LocalBackend, Agent, agent socket.

The agent's asyncio loop runs in a background thread, as it would beside a real
workload; tests talk to the socket with ordinary (blocking) clients such as py-spiffe.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from identity.admin import IdentityAdmin
from identity.agent import Agent
from identity.agent_endpoints import AgentEndpoints
from identity.authority import CertificateAuthority
from identity.entries import Entry, EntrySpec
from identity.local_backend import LocalBackend
from identity.store.database import Database
from identity.unix_attestor import UnixAttestor
from identity.workload_cache import WorkloadCache

T = TypeVar("T")
AGENT_ID = "spiffe://example.org/meshward/agent/local"


def utcnow() -> datetime:
    return datetime.now(UTC)


class AgentStack:
    def __init__(self, ca: CertificateAuthority, db: Database) -> None:
        # Not pytest's tmp_path: the agent socket must be reachable by other users' processes.
        self.root = Path(tempfile.mkdtemp(prefix="meshward-agent-"))
        self.root.chmod(0o755)
        self.socket = self.root / "agent.sock"
        self.admin = IdentityAdmin(db=db, ca=ca, default_parent_id=AGENT_ID, clock=utcnow)
        self.cache = WorkloadCache(ca.bundle)
        self.agent = Agent(
            backend=LocalBackend(admin=self.admin, agent_id=AGENT_ID, clock=utcnow),
            cache=self.cache,
            clock=utcnow,
            interval=0.1,
        )
        self.endpoints = AgentEndpoints(
            socket=self.socket,
            private_dir=self.root / "private",
            attestors=[UnixAttestor()],
            source=self.cache,
            sign_jwt=self.agent.sign_jwt_svid,
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.agent.sync())
        self.run(self.endpoints.start())
        self._agent_task = asyncio.run_coroutine_threadsafe(self.agent.run(), self.loop)

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the agent's loop (for reading state the loop owns)."""

        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def register(self, spiffe_id: str, *selectors: str, **fields: Any) -> Entry:
        return self.admin.create_entry(
            EntrySpec(spiffe_id=spiffe_id, parent_id="", selectors=selectors, **fields)
        )

    def close(self) -> None:
        self._agent_task.cancel()
        self.run(self.endpoints.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)
