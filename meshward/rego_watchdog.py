"""Kills ``meshward authz`` when one Rego evaluation runs past its hard limit.

regorus evaluates holding the GIL and its Python binding cannot interrupt an
evaluation, so a policy that explodes (``some i in numbers.range(1, 1e9)``) would stall
the whole process: no Check, no health answer, no reload, for as long as it runs.
``authz.rego.timeout`` already discards a late result (the request is denied with
``timeout``); this bounds the stall. The process writes when its current evaluation
started into a shared 8-byte slot (two stores per decision); a small watcher process
reads it and, once one evaluation has run ``limit`` seconds, logs why and sends the
authz process SIGKILL (nothing gentler is handled while the GIL is held). Envoy fails
the requests in flight closed, and ``meshward up`` (or the service manager) starts the
process again. The watcher leaves when its parent does.

Both processes read ``time.monotonic``, one clock for the whole machine on Linux.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import time

__all__ = ["RegoWatchdog"]

_SLOT = struct.Struct("d")


class RegoWatchdog:
    """The slot and its watcher; ``started``/``finished`` bracket each evaluation."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        fd = os.memfd_create("meshward-rego-watch")
        try:
            os.ftruncate(fd, _SLOT.size)
            self._slot = mmap.mmap(fd, _SLOT.size)
            command = [sys.executable, "-m", "meshward.rego_watchdog", str(os.getpid())]
            self._watcher = subprocess.Popen(
                [*command, str(fd), repr(limit)],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(fd)

    def started(self) -> None:
        _SLOT.pack_into(self._slot, 0, time.monotonic())

    def finished(self) -> None:
        _SLOT.pack_into(self._slot, 0, 0.0)

    def close(self) -> None:
        self._watcher.terminate()
        self._watcher.wait()
        self._slot.close()


def _watch(parent: int, fd: int, limit: float) -> None:
    slot = mmap.mmap(fd, _SLOT.size)
    poll = min(max(limit / 4, 0.01), 0.25)
    while os.getppid() == parent:
        (started,) = _SLOT.unpack_from(slot, 0)
        if started and time.monotonic() - started > limit:
            print(
                f"meshward authz: a Rego evaluation has run longer than {limit:g} s (ten times "
                "authz.rego.timeout) and cannot be interrupted; killing the process so that it "
                "is restarted",
                file=sys.stderr,
                flush=True,
            )
            os.kill(parent, signal.SIGKILL)
            return
        time.sleep(poll)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is for the parent
    _watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
