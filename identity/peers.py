"""Who is on the other end of a Unix socket: SO_PEERCRED plus the process's start time.

The start time (clock ticks since boot, field 22 of /proc/<pid>/stat) pins the process:
a pid alone can be recycled by another process between accept() and attestation.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from identity.errors import AttestationError

__all__ = ["PROC", "Peer", "peer_of", "process_start_time"]

PROC = Path("/proc")
_UCRED = struct.Struct("3i")


@dataclass(slots=True, frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    start_time: int

    def is_alive(self, proc: Path = PROC) -> bool:
        """True while the very process that connected (not a successor on its pid) runs."""
        return process_start_time(self.pid, proc) == self.start_time


def peer_of(sock: socket.socket, proc: Path = PROC) -> Peer:
    """The process that connected ``sock`` (a connected AF_UNIX socket)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise AttestationError("the connection carries no peer process (not a local Unix socket?)")
    start = process_start_time(pid, proc)
    if start is None:
        raise AttestationError(f"process {pid} exited before it could be attested")
    return Peer(pid=pid, uid=uid, gid=gid, start_time=start)


def process_start_time(pid: int, proc: Path = PROC) -> int | None:
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may itself hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])
