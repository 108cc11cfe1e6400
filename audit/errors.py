"""Errors of the audit package, each worded as what to fix.

::

    AuditError                 any audit problem a user can act on
    ├── SpoolError             the spool directory cannot be used (locked, unwritable)
    ├── StoreError             the audit database cannot be reached or migrated
    └── QueryError             a filter, cursor or aggregate that is not valid (HTTP 400)
"""

from __future__ import annotations

__all__ = ["AuditError", "QueryError", "SpoolError", "StoreError"]


class AuditError(Exception):
    """An audit problem, worded as what to fix."""


class SpoolError(AuditError):
    pass


class StoreError(AuditError):
    pass


class QueryError(AuditError):
    """A bad query parameter; ``field`` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field
