"""Process wiring for ``meshward audit ship`` (the shipper) and ``meshward audit serve`` (the API).

The API opens the store read-only. It migrates the schema first (so that it can start
before any shipper has), and when the database is down at start it serves anyway:
``/ready`` says why it is not ready, and the migration is retried until it works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from audit.api import create_audit_app
from audit.errors import StoreError
from audit.shipper import Shipper
from audit.store.database import AuditDatabase
from audit.store.retention import Retention
from identity.health_api import health_router
from meshward.audit_tools import explainer, replayer
from meshward.config import Config
from meshward.lifeline import watch as lifeline_watch

__all__ = ["AuditServer", "run_audit_server", "run_shipper"]

log = logging.getLogger("meshward")
_NICE = 10


def run_shipper(config: Config, *, once: bool = False, lifeline: BinaryIO | None = None) -> None:
    """Drain ``config.audit_spool`` into the audit database until SIGTERM/SIGINT.

    ``once``: drain what is there and exit. ``lifeline``: also stop at its end of file,
    when the ``meshward authz`` that started this one closes it or is gone (even after
    a SIGKILL); its replacement starts a shipper of its own, which waits for this one's
    lock.
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
        if lifeline is not None:
            # Shipping can wait; a Check cannot. SCHED_BATCH: waking up, the shipper does
            # not preempt authz or Envoy; nice 10: when they compete it still gets about
            # a tenth of a busy core (more than a saturated authz on 2 cores records),
            # and all of an idle one.
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            os.nice(_NICE)
            lifeline_watch(lifeline, stop.set)
        log.info(
            "meshward audit ship: %s → %s (pid %d)", config.audit_spool, db.display_url, os.getpid()
        )
        shipper.run(stop)
    finally:
        db.dispose()


class AuditServer:
    """The query API, the page and health for one audit database."""

    def __init__(self, config: Config, *, policies: Path | None = None) -> None:
        self.config = config
        self.url = config.audit_database_url
        self.reader = AuditDatabase(self.url, read_only=True)
        self.registry = CollectorRegistry()
        self.migrated = False
        self.last_error: str | None = None
        roots = list(config.audit.replay_roots) or ([policies] if policies else [])
        self.app: FastAPI = create_audit_app(
            self.reader,
            registry=self.registry,
            explain=explainer(config),
            replay=replayer(config, roots),
        )
        self.app.include_router(health_router(self.registry, self.ready))

    def migrate(self) -> bool:
        """Create or update the schema with a writable connection; False while it fails."""
        writer = AuditDatabase(self.url)
        try:
            writer.migrate()
        except StoreError as exc:
            if str(exc) != self.last_error:
                log.error("audit: %s; retrying", exc)
            self.last_error = str(exc)
            return False
        finally:
            writer.dispose()
        self.migrated, self.last_error = True, None
        return True

    async def keep_migrating(self) -> None:
        delay = 0.5
        while not self.migrated:
            if await asyncio.to_thread(self.migrate):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        details: dict[str, Any] = {"database": self.reader.display_url}
        if not self.migrated:
            details["error"] = self.last_error or "the schema is not created yet"
            return False, details
        try:
            self.reader.check()
        except StoreError as exc:
            details["error"] = str(exc)
            return False, details
        return True, details

    def close(self) -> None:
        self.reader.dispose()


def run_audit_server(config: Config, *, policies: Path | None) -> None:
    """Serve the API and page on ``audit.listen`` until SIGINT/SIGTERM."""
    from meshward.runtime import _listen_tcp, _Server, _uvicorn_config

    sock = _listen_tcp(config.audit.listen, setting="audit.listen")
    server = AuditServer(config, policies=policies)

    async def serve() -> None:
        http = _Server(_uvicorn_config(server.app))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(http, "should_exit", True))
        migrating = asyncio.create_task(server.keep_migrating())
        host, port = sock.getsockname()[:2]
        log.info(
            "meshward audit: API and page on http://%s:%d/ (OpenAPI at /docs), store %s",
            host,
            port,
            server.reader.display_url,
        )
        try:
            await http.serve(sockets=[sock])
        finally:
            migrating.cancel()

    try:
        asyncio.run(serve())
    finally:
        sock.close()
        server.close()
