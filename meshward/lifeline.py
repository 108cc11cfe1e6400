"""Child meshward processes that get their config on stdin and keep the pipe as a lifeline.

The parent writes its resolved configuration as one JSON line (never in argv, where a
database password would show in ``ps``) and leaves the pipe open. The child stops at
end of file: when the parent closes the pipe to stop it, or dies, even by SIGKILL, so
no child outlives the process tree that started it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from meshward.config import Config

__all__ = ["read_config", "spawn", "stop", "watch"]


def spawn(args: Sequence[str], config: Config) -> subprocess.Popen[bytes]:
    """``python -m meshward ARGS --config-stdin``, configured with ``config``."""
    child = subprocess.Popen(
        [sys.executable, "-m", "meshward", *args, "--config-stdin"],
        stdin=subprocess.PIPE,
        # A Ctrl-C at the terminal reaches the parent only, which then stops the child in
        # its own order (authz drains its spool after its last decision, not before).
        start_new_session=True,
    )
    assert child.stdin is not None
    child.stdin.write(config.model_dump_json().encode() + b"\n")
    child.stdin.flush()
    return child


def stop(child: subprocess.Popen[bytes], *, timeout: float = 30.0) -> int:
    """Close the lifeline, wait ``timeout`` for the child to finish its work, then kill it."""
    if child.stdin is not None:
        with contextlib.suppress(OSError):
            child.stdin.close()
    try:
        return child.wait(timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        return child.wait(10)


def read_config(stream: BinaryIO | None = None) -> Config:
    return Config.model_validate_json((stream or sys.stdin.buffer).readline())


def watch(lifeline: BinaryIO, on_end: Callable[[], Any]) -> threading.Thread:
    """Call ``on_end`` (from another thread) once ``lifeline`` reaches end of file."""

    def run() -> None:
        while lifeline.read(4096):
            pass
        on_end()

    thread = threading.Thread(target=run, name="lifeline", daemon=True)
    thread.start()
    return thread
