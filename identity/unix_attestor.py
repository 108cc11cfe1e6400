"""The ``unix`` workload attestor: selectors from the caller's process, as SPIRE names them.

``unix:uid``, ``unix:user``, ``unix:gid``, ``unix:group``, ``unix:supplementary_gid``,
``unix:supplementary_group`` always; ``unix:path`` and ``unix:sha256`` of the binary
when path discovery is on. After reading /proc the process is checked again: if the pid
now belongs to another process, attestation fails rather than describe the wrong one.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from identity.errors import AttestationError
from identity.peers import PROC, Peer
from identity.selectors import Selector

__all__ = ["UnixAttestor"]


@dataclass(slots=True, frozen=True)
class UnixAttestor:
    discover_workload_path: bool = False
    workload_size_limit: int = 128 * 1024 * 1024  # bytes hashed at most for unix:sha256
    proc: Path = PROC

    def attest(self, peer: Peer) -> tuple[Selector, ...]:
        selectors = [Selector("unix", "uid", str(peer.uid)), Selector("unix", "gid", str(peer.gid))]
        user = _user_name(peer.uid)
        if user is not None:
            selectors.append(Selector("unix", "user", user))
        group = _group_name(peer.gid)
        if group is not None:
            selectors.append(Selector("unix", "group", group))
        for gid in self._supplementary_gids(peer):
            selectors.append(Selector("unix", "supplementary_gid", str(gid)))
            name = _group_name(gid)
            if name is not None:
                selectors.append(Selector("unix", "supplementary_group", name))
        if self.discover_workload_path:
            path, digest = self._binary(peer)
            selectors += [Selector("unix", "path", path), Selector("unix", "sha256", digest)]
        if not peer.is_alive(self.proc):
            raise AttestationError(
                f"process {peer.pid} exited or its pid was reused during attestation"
            )
        return tuple(sorted(set(selectors)))

    def _supplementary_gids(self, peer: Peer) -> list[int]:
        try:
            status = (self.proc / str(peer.pid) / "status").read_text()
        except OSError as exc:
            raise AttestationError(f"cannot read the groups of process {peer.pid}: {exc}") from exc
        for line in status.splitlines():
            if line.startswith("Groups:"):
                return sorted({int(g) for g in line.split()[1:]})
        return []

    def _binary(self, peer: Peer) -> tuple[str, str]:
        exe = self.proc / str(peer.pid) / "exe"
        try:
            path = os.readlink(exe)
            size = exe.stat().st_size
            if size > self.workload_size_limit:
                raise AttestationError(
                    f"binary {path} of process {peer.pid} is {size} bytes, over the "
                    f"{self.workload_size_limit}-byte limit for hashing"
                )
            digest = hashlib.sha256()
            with exe.open("rb") as binary:
                while chunk := binary.read(1024 * 1024):
                    digest.update(chunk)
        except OSError as exc:
            raise AttestationError(f"cannot read the binary of process {peer.pid}: {exc}") from exc
        return path, digest.hexdigest()


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
