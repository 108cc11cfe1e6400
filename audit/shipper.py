"""The shipper: drains a spool into the audit store, exactly once, whatever crashes.

It reads entries from the position the store holds for the spool, writes them and the
new position in one transaction (:class:`audit.store.ingest.StoreWriter`), and only
then deletes the segments wholly behind that position. So:

- a kill of the shipper before the commit re-sends the batch (nothing was stored),
  after it resumes behind it (the position was stored with the rows);
- a kill of the writer (the authz process) leaves its segments as they are: the
  shipper reads to the last whole frame and goes on once a newer segment exists;
- a database that is down or slow stops the shipper, not the writer: the spool
  grows (up to ``audit.spool.max_bytes``) and drains when the database returns,
  retried with backoff.

It runs as its own process (``meshward audit ship``, started and restarted by
``meshward authz``), so that decoding and inserting never take the authz process's
CPU or GIL from Check calls. A lock on the spool keeps it to one shipper at a time.
Progress is reported in ``shipper.json`` next to the segments, which the authz
process turns into metrics and ``/ready`` details.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit.errors import StoreError
from audit.spool import Position, SpoolReader, prepare_directory, spool_id, write_private
from audit.store.database import AuditDatabase
from audit.store.ingest import StoreWriter, decode_entries
from audit.store.retention import Retention, enforce_retention

__all__ = ["STATUS_FILE", "Shipper", "ShipperStatus", "read_status"]

log = logging.getLogger(__name__)

STATUS_FILE = "shipper.json"
_MAX_BACKOFF = 5.0


@dataclasses.dataclass(slots=True)
class ShipperStatus:
    """What ``shipper.json`` says: where the shipper is, and what went wrong last."""

    spool_id: str
    database: str
    pid: int
    segment: int = 0
    offset: int = 0
    shipped: int = 0  # records stored from this spool, over every run
    oldest_pending_us: int | None = None  # time of the oldest record not yet stored
    last_commit_us: int | None = None
    last_error: str | None = None
    last_error_us: int | None = None
    updated_us: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_status(directory: Path) -> dict[str, Any] | None:
    """The shipper's last report for the spool in ``directory``; None before its first."""
    try:
        data = json.loads((directory / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Shipper:
    def __init__(
        self,
        directory: Path,
        db: AuditDatabase,
        *,
        retention: Retention | None = None,
        retention_interval: float = 300.0,
        batch_records: int = 5000,
        batch_bytes: int = 8 * 1024 * 1024,
        poll_interval: float = 0.5,
        status_interval: float = 1.0,
        clock: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        prepare_directory(directory)
        self.directory = directory
        self.db = db
        self._reader = SpoolReader(directory)
        self._writer = StoreWriter(db)
        self._retention = retention
        self._retention_interval = retention_interval
        self._batch_records = batch_records
        self._batch_bytes = batch_bytes
        self._poll = poll_interval
        self._status_interval = status_interval
        self._clock = clock
        self.status = ShipperStatus(
            spool_id=spool_id(directory), database=db.display_url, pid=os.getpid()
        )
        self._position: Position | None = None
        self._migrated = False
        self._status_at = 0.0
        self._retention_at = 0.0

    def run(self, stop: threading.Event) -> None:
        """Ship until ``stop`` is set; database failures are retried, never raised."""
        lock = self._lock(stop)
        if lock is None:
            return
        try:
            backoff = 0.1
            while not stop.is_set():
                try:
                    shipped = self.ship_once()
                except StoreError as exc:
                    self._failed(str(exc))
                    stop.wait(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF)
                    continue
                backoff = 0.1
                self._maybe_enforce_retention()
                self._maybe_report()
                if not shipped:
                    stop.wait(self._poll)
            self._last_drain()
            self._report()
        finally:
            os.close(lock)

    def _last_drain(self, seconds: float = 10.0) -> None:
        """On stop, ship what the spool holds now (a stopping authz has closed it), briefly:
        whatever is left waits in the spool for the next shipper."""
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline and self.ship_once():
                pass
        except StoreError as exc:
            self._failed(str(exc))

    def ship_once(self) -> int:
        """One batch from the spool into the store; how many entries. Raises StoreError."""
        if not self._migrated:
            self.db.migrate()  # the database may have been down when the shipper started
            self._migrated = True
        if self._position is None:
            stored = self._writer.position(self.status.spool_id)
            if stored is None:
                self._position, self.status.shipped = self._reader.first(), 0
            else:
                self._position, self.status.shipped = stored
        start = self._position
        entries, end, problems = self._reader.read(
            start, max_entries=self._batch_records, max_bytes=self._batch_bytes
        )
        for problem in problems:
            log.error("audit: %s", problem)
        if not entries and end == start:
            self.status.oldest_pending_us = None
            self._reader.delete_before(start)
            return 0
        batch = decode_entries(entries)
        for problem in batch.problems:
            log.error("audit: %s", problem)
        self.status.oldest_pending_us = batch.oldest_us
        self._writer.write(
            batch,
            spool_id=self.status.spool_id,
            position=end,
            records=self.status.shipped + len(batch.decisions),
        )
        self._position = end
        self.status.shipped += len(batch.decisions)
        self.status.segment, self.status.offset = end.segment, end.offset
        self.status.last_commit_us = self._clock()
        self.status.last_error = None
        self._reader.delete_before(end)
        return len(entries)

    def drain(self, *, timeout: float = 30.0) -> None:
        """Ship until the spool holds nothing more (for tests and ``audit ship --once``)."""
        deadline = time.monotonic() + timeout
        while self.ship_once():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the spool {self.directory} did not drain in {timeout}s")
        self._report()

    def _failed(self, error: str) -> None:
        if error != self.status.last_error:
            log.error("audit: %s; the spool keeps the records and retries", error)
        self.status.last_error = error
        self.status.last_error_us = self._clock()
        self._report()

    def _maybe_enforce_retention(self) -> None:
        if self._retention is None or time.monotonic() < self._retention_at:
            return
        self._retention_at = time.monotonic() + self._retention_interval
        try:
            enforce_retention(self.db, self._retention, now_us=self._clock())
        except StoreError as exc:
            log.error("audit: %s", exc)

    def _maybe_report(self) -> None:
        if time.monotonic() >= self._status_at:
            self._report()

    def _report(self) -> None:
        self._status_at = time.monotonic() + self._status_interval
        self.status.updated_us = self._clock()
        path = self.directory / STATUS_FILE
        try:
            write_private(path, json.dumps(self.status.as_dict()))
        except OSError as exc:
            log.warning("audit: cannot write %s: %s", path, exc)

    def _lock(self, stop: threading.Event, *, grace: float = 10.0) -> int | None:
        """The spool's shipper lock, waited for: a shipper being replaced may still run.

        Asked to stop before it has the lock (a last drain), it still waits ``grace``
        seconds for it; None if the lock never came.
        """
        path = self.directory / "shipper.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        waited = False
        until: float | None = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            if not waited:
                log.info("audit: another shipper drains %s; waiting for it", self.directory)
                waited = True
            if stop.is_set():
                until = until or time.monotonic() + grace
                if time.monotonic() >= until:
                    break
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.close(fd)
        return None
