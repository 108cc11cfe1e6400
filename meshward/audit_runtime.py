"""Process wiring for ``meshward audit ship`` (the shipper) and ``meshward audit`` (the API)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from audit.shipper import Shipper
from audit.store.database import AuditDatabase
from audit.store.retention import Retention
from meshward.config import Config

__all__ = ["run_shipper"]

log = logging.getLogger("meshward")
_PARENT_CHECK = 0.5  # seconds between looks at whether the parent authz is still there


def run_shipper(config: Config, *, once: bool = False, follow_parent: bool = False) -> None:
    """Drain ``config.audit_spool`` into the audit database until SIGTERM/SIGINT.

    ``once``: drain what is there and exit. ``follow_parent``: also exit when the
    process that started this one is gone (``meshward authz`` after a SIGKILL): its
    replacement starts a shipper of its own, which waits for this one's lock.
    """
    db = AuditDatabase(config.audit_database_url)
    retention = config.audit.retention
    shipper = Shipper(
        config.audit_spool,
        db,
        retention=Retention(
            max_age_us=int(retention.max_age.total_seconds() * 1e6) if retention.max_age else None,
            max_rows=retention.max_rows,
        ),
        retention_interval=retention.interval.total_seconds(),
    )
    try:
        if once:
            db.migrate()
            shipper.drain(timeout=3600)
            return
        stop = threading.Event()

        def stopping(signum: int, frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stopping)
        if follow_parent:
            parent = os.getppid()
            threading.Thread(
                target=_watch_parent, args=(parent, stop), name="parent-watch", daemon=True
            ).start()
        log.info(
            "meshward audit ship: %s → %s (pid %d)", config.audit_spool, db.display_url, os.getpid()
        )
        shipper.run(stop)
    finally:
        db.dispose()


def _watch_parent(parent: int, stop: threading.Event) -> None:
    while not stop.wait(_PARENT_CHECK):
        if os.getppid() != parent:
            log.info("meshward audit ship: the authz process %d is gone; stopping", parent)
            stop.set()
