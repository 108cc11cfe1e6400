"""Recording issued certificates with group commit, off the signing path.

Signing a certificate takes ~0.1 ms; committing one row to SQLite costs about as much
again. Records are queued and a background thread inserts them in batches, one
transaction per batch. ``flush`` waits until everything queued so far is committed;
while the database is unreachable records wait in memory (up to ``max_pending``, after
which signing blocks rather than drop a record).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from itertools import islice

from sqlalchemy.exc import IntegrityError

from identity.errors import StoreError
from identity.store.database import Database
from identity.store.issued import IssuedCertificate, record_issued

__all__ = ["IssuanceLog"]

log = logging.getLogger(__name__)


class IssuanceLog:
    def __init__(
        self,
        db: Database,
        *,
        batch_size: int = 1024,
        max_pending: int = 100_000,
        window: float = 0.005,
    ) -> None:
        self._db = db
        self._window = window
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: deque[IssuedCertificate] = deque()
        self._queued = 0
        self._written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="issuance-log", daemon=True)
        self._thread.start()

    def record(self, issued: IssuedCertificate) -> None:
        with self._cond:
            self._cond.wait_for(lambda: len(self._pending) < self._max_pending or self._closed)
            if self._closed:
                raise StoreError("the issuance log is closed; the server is shutting down")
            self._pending.append(issued)
            self._queued += 1
            if len(self._pending) == 1:
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record queued before this call is committed; False on timeout."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._written >= target, timeout)

    def close(self, timeout: float = 10.0) -> None:
        if not self.flush(timeout):
            log.error("issuance log: %d records not written at shutdown", len(self._pending))
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closed)
                if self._closed:
                    return
            # Let a batch gather: one commit then covers every signature of the window.
            time.sleep(self._window)
            with self._cond:
                batch = list(islice(self._pending, self._batch_size))
            try:
                written = self._write(batch)
            except StoreError as exc:
                log.warning("issuance log: cannot write %d records (%s); retrying", len(batch), exc)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.05
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
                self._written += written
                self._cond.notify_all()

    def _write(self, batch: list[IssuedCertificate]) -> int:
        try:
            with self._db.connection() as conn:
                record_issued(conn, issued=batch)
        except StoreError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            # One bad row (a repeated serial) must not hold the rest back forever.
            for issued in batch:
                try:
                    with self._db.connection() as conn:
                        record_issued(conn, issued=[issued])
                except StoreError as row_exc:
                    if not isinstance(row_exc.__cause__, IntegrityError):
                        raise
                    log.error(
                        "issuance log: dropped record of serial %s: %s", issued.serial, row_exc
                    )
        return len(batch)
