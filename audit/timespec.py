"""Points in time as the query API and CLI take them: RFC 3339, or a span back from now."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from audit.errors import QueryError

__all__ = ["format_time", "parse_time"]

_SPAN = re.compile(r"(\d+)(s|m|h|d|w)")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str, *, now_us: int, field: str) -> int:
    """Microseconds since the epoch for ``value``: ``2027-01-01T12:00:00Z`` (a date alone
    is its midnight UTC) or ``15m`` / ``24h`` / ``7d`` / ``1h30m`` before ``now_us``."""
    text = value.strip()
    parts = _SPAN.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        return now_us - sum(int(n) * _SECONDS[u] for n, u in parts) * 1_000_000
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(
            f"{field}={value!r} is not a time; use RFC 3339 (2027-01-01T12:00:00Z) or a span back "
            "from now (15m, 24h, 7d)",
            field=field,
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000)


def format_time(us: int) -> str:
    """RFC 3339 in UTC with microseconds: ``2027-01-01T12:00:00.123456Z``."""
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")
