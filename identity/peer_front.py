"""A Unix-socket front for a grpcio server that tells each call which process made it.

gRPC's C core does not expose SO_PEERCRED (grpc/grpc#15511, #28755): a grpcio servicer
on a Unix socket sees only ``unix:``. So workloads connect here instead; for every
connection the front reads the caller's credentials, opens its own connection to the
real gRPC server from a socket *bound to a fresh path* in a private directory, and
pumps bytes both ways. The servicer's ``context.peer()`` is then ``unix:<that path>``,
which :meth:`PeerFront.lookup` maps back to the caller. A connection that did not come
through the front (only possible for the agent's own user, since the gRPC server's
socket sits in a 0700 directory) maps to nothing and is refused by the servicer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections import Counter
from pathlib import Path

from identity.errors import AttestationError
from identity.peers import PROC, Peer, peer_of

__all__ = ["BACKLOG", "MAX_CONNECTIONS_PER_UID", "PeerFront"]

log = logging.getLogger(__name__)
_CHUNK = 64 * 1024
# asyncio's default of 100 refuses all but the first hundred workloads that reconnect at
# once after an agent restart (bench/fanout.py --burst); the kernel caps it at somaxconn.
BACKLOG = 4096
# Connections one uid may hold open at once (agent.max_connections_per_uid): any local user
# may connect, and each connection costs the agent a relay and an upstream connection.
MAX_CONNECTIONS_PER_UID = 256


class PeerFront:
    def __init__(
        self,
        *,
        listen: Path,
        upstream: Path,
        tag_dir: Path,
        proc: Path = PROC,
        max_per_uid: int = MAX_CONNECTIONS_PER_UID,
    ) -> None:
        self.listen = listen
        self._max_per_uid = max_per_uid
        self._per_uid: Counter[int] = Counter()
        self.refused = 0  # connections refused for their uid's limit
        self._upstream = upstream
        self._tag_dir = tag_dir
        self._proc = proc
        self._peers: dict[str, Peer] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def lookup(self, grpc_peer: str) -> Peer | None:
        """The caller behind a grpcio ``context.peer()`` string, or None if it bypassed the front."""
        return self._peers.get(grpc_peer.removeprefix("unix:"))

    @property
    def connections(self) -> int:
        return len(self._peers)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``sock`` if the caller bound it already (to report errors early), else bind."""
        self._tag_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._tag_dir, 0o700)
        for stale in self._tag_dir.glob("*.sock"):
            stale.unlink()
        if sock is None:
            self.listen.unlink(missing_ok=True)
            self._server = await asyncio.start_unix_server(
                self._serve, path=str(self.listen), backlog=BACKLOG
            )
        else:
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        # Any local user may connect: what a caller gets depends only on its attestation.
        os.chmod(self.listen, 0o666)  # noqa: S103 - deliberate, see above

    async def close(self) -> None:
        """Stop accepting, end every open connection, and wait until they are closed."""
        if self._server is not None:
            self._server.close()
            self.listen.unlink(missing_ok=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            # close() ends connections this way; returning (not re-raising) keeps Python
            # 3.11's stream protocol from logging the cancellation as an error.
            pass
        finally:
            self._tasks.discard(task)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = peer_of(writer.get_extra_info("socket"), self._proc)
        except (AttestationError, OSError) as exc:
            log.info("peer front: refused a connection: %s", exc)
            writer.close()
            return
        if self._per_uid[peer.uid] >= self._max_per_uid:
            self.refused += 1
            log.warning(
                "peer front: refused a connection of pid %d: uid %d already holds %d "
                "(agent.max_connections_per_uid)",
                peer.pid,
                peer.uid,
                self._max_per_uid,
            )
            writer.close()
            return
        self._per_uid[peer.uid] += 1
        try:
            await self._relay_for(peer, reader, writer)
        finally:
            self._per_uid[peer.uid] -= 1
            if not self._per_uid[peer.uid]:
                del self._per_uid[peer.uid]

    async def _relay_for(
        self, peer: Peer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        tag = str(self._tag_dir / f"{next(self._ids)}.sock")
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.bind(tag)
            upstream.setblocking(False)
            await asyncio.get_running_loop().sock_connect(upstream, str(self._upstream))
            self._peers[tag] = peer
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
        except OSError as exc:
            log.error("peer front: cannot reach the gRPC server at %s: %s", self._upstream, exc)
            upstream.close()
            writer.close()
            self._forget(tag)
            return
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._forget(tag)
            for w in (writer, up_writer):
                w.close()
            for w in (writer, up_writer):
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()

    def _forget(self, tag: str) -> None:
        self._peers.pop(tag, None)
        with contextlib.suppress(OSError):
            os.unlink(tag)


async def _pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(_CHUNK):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # Half-close so the other side sees end of stream and finishes its own direction.
        with contextlib.suppress(OSError, RuntimeError):
            if sink.can_write_eof():
                sink.write_eof()
