"""Where producers hand decisions: the protocol, and the in-memory sink of offline tools."""

from __future__ import annotations

from typing import Protocol

from audit.record import DecisionRecord

__all__ = ["AuditSink", "MemorySink"]


class AuditSink(Protocol):
    def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
        """Keep ``record`` (and the redacted request snapshot) without blocking.

        False when it could not be kept (the spool is full): the caller applies
        ``audit.on_full``. Never raises for a full or failing disk.
        """
        ...


class MemorySink:
    """Keeps records in a list: ``meshward policy test|eval`` and tests."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []
        self.requests: list[bytes | None] = []

    def submit(self, record: DecisionRecord, request: bytes | None = None) -> bool:
        self.records.append(record)
        self.requests.append(request)
        return True
