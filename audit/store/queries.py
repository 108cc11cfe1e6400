"""The questions users ask of the audit trail, as SQL on either backend.

Every query takes :class:`Filters` (AND-ed; each one a URL parameter, so a view can be
shared) and runs on a connection the caller opened (read-only for the API). Lists are
newest first with keyset cursors (``ts``, ``decision_id``), never OFFSET, so a page
deep in a million decisions costs what the first one does.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    case,
    func,
    literal,
    select,
    true,
    tuple_,
)

from audit.errors import QueryError
from audit.record import DecisionRecord
from audit.store.ingest import COLUMNS, HOUR_US, MINUTE_US, policy_set_files
from audit.store.models import (
    DecisionHourRow,
    DecisionMinuteRow,
    DecisionRow,
    DryRunFlipRow,
    PolicySetRow,
)
from audit.timespec import format_time, parse_time

__all__ = [
    "FILTERS",
    "GROUPS",
    "Aggregate",
    "Filters",
    "Page",
    "StoredPolicySet",
    "dry_run_policies",
    "edges",
    "get_decision",
    "iter_decisions",
    "list_decisions",
    "policy_set",
    "policy_set_settings",
    "series",
    "top",
]

D = DecisionRow.__table__.c
F = DryRunFlipRow.__table__.c
MAX_PAGE = 1000
DEFAULT_SPAN_US = 24 * 3600 * 1_000_000  # aggregates without `since` cover the last 24 h

# URL parameter → what it filters, for the API's OpenAPI and the CLI's --help.
FILTERS: dict[str, str] = {
    "since": "from this time (RFC 3339, or 15m / 24h / 7d back from now)",
    "until": "before this time (same forms)",
    "allowed": "true: allowed decisions only; false: denied only",
    "engine": "the engine that decided: istio, rego or error",
    "reason": "the reason, e.g. denied_by_policy, no_allow_policy_matched",
    "policy": "the deciding policy: ns.name, or a Rego decision path",
    "rule": "the deciding rule's index in that policy",
    "principal": "the source principal, exactly (example.org/ns/default/sa/web)",
    "principal_prefix": "source principals starting with this",
    "source_namespace": "the source's namespace (from its principal)",
    "namespace": "the destination workload's namespace",
    "workload": "the destination workload (its app label)",
    "service": "the destination service",
    "method": "the HTTP method",
    "path_prefix": "paths starting with this",
    "status": "the HTTP status of a denial (allowed decisions have none)",
    "dry_run_flip": "true: only decisions some dry-run policy would have changed",
    "decision_id": "one decision",
    "version": "decided by this policy-set version",
}
# `top` groups by one of these (name → column).
GROUPS: dict[str, Any] = {
    "principal": D.source_principal,
    "source_namespace": D.source_namespace,
    "request_principal": D.request_principal,
    "policy": D.policy,
    "rule": D.policy_id,
    "reason": D.reason,
    "engine": D.engine,
    "namespace": D.destination_namespace,
    "workload": D.destination_workload,
    "path": D.path,
    "method": D.method,
    "status": D.status,
}


@dataclass(slots=True, frozen=True)
class Filters:
    since_us: int | None = None
    until_us: int | None = None
    allowed: bool | None = None
    engine: str | None = None
    reason: str | None = None
    policy: str | None = None
    rule: int | None = None
    principal: str | None = None
    principal_prefix: str | None = None
    source_namespace: str | None = None
    namespace: str | None = None
    workload: str | None = None
    service: str | None = None
    method: str | None = None
    path_prefix: str | None = None
    status: int | None = None
    dry_run_flip: bool = False
    decision_id: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str | None], *, now_us: int) -> Filters:
        """Filters from URL (or CLI) parameters; QueryError names a bad or unknown one."""
        values: dict[str, Any] = {}
        for name, raw in params.items():
            if raw is None or raw == "":
                continue
            if name not in FILTERS:
                raise QueryError(
                    f"unknown filter {name!r}; filters are {', '.join(FILTERS)}", field=name
                )
            if name in ("since", "until"):
                values[f"{name}_us"] = parse_time(raw, now_us=now_us, field=name)
            elif name in ("allowed", "dry_run_flip"):
                values[name] = _boolean(raw, name)
            elif name in ("rule", "status"):
                values[name] = _integer(raw, name)
            else:
                values[name] = raw
        return cls(**values)

    def as_params(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or value is False:
                continue
            name = f.name.removesuffix("_us")
            if f.name.endswith("_us"):
                out[name] = format_time(value)
            elif isinstance(value, bool):
                out[name] = "true" if value else "false"
            else:
                out[name] = str(value)
        return out

    def with_default_span(self, now_us: int) -> Filters:
        if self.since_us is not None or self.decision_id is not None:
            return self
        until = self.until_us if self.until_us is not None else now_us
        return _replace(self, since_us=until - DEFAULT_SPAN_US)

    def where(self) -> list[ColumnElement[bool]]:
        """The WHERE clauses on ``decisions``."""
        out: list[ColumnElement[bool]] = []
        if self.since_us is not None:
            out.append(D.ts >= self.since_us)
        if self.until_us is not None:
            out.append(D.ts < self.until_us)
        if self.allowed is not None:
            out.append(D.allowed == self.allowed)
        for value, column in (
            (self.engine, D.engine),
            (self.reason, D.reason),
            (self.policy, D.policy),
            (self.rule, D.rule),
            (self.principal, D.source_principal),
            (self.source_namespace, D.source_namespace),
            (self.namespace, D.destination_namespace),
            (self.workload, D.destination_workload),
            (self.service, D.destination_service),
            (self.method, D.method),
            (self.status, D.status),
            (self.decision_id, D.decision_id),
            (self.version, D.policy_set_version),
        ):
            if value is not None:
                out.append(column == value)
        for prefix, column in (
            (self.principal_prefix, D.source_principal),
            (self.path_prefix, D.path),
        ):
            if prefix is not None:
                # substr, not LIKE: exact and case-sensitive on both backends.
                out.append(func.substr(column, 1, len(prefix)) == prefix)
        if self.dry_run_flip:
            out.append(D.dry_run_flip == true())
        return out


def _replace(filters: Filters, **changes: Any) -> Filters:
    values = {f.name: getattr(filters, f.name) for f in fields(filters)}
    values.update(changes)
    return Filters(**values)


def _boolean(raw: str, name: str) -> bool:
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise QueryError(f"{name}={raw!r}: use true or false", field=name)


def _integer(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise QueryError(f"{name}={raw!r} is not a number", field=name) from None


# -- decisions -------------------------------------------------------------------------

_LIST_COLUMNS = [D.ts, *(getattr(D, name) for name in COLUMNS), D.dry_run_flip, D.detail]


def record_dict(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A stored decision as the record it was (``time_us``, ``time`` and every field)."""
    values: dict[str, Any] = orjson.loads(row["detail"])
    values.update({name: row[name] for name in COLUMNS})
    values["allowed"] = bool(values["allowed"])
    values["time_us"] = int(row["ts"])
    # Through the record type: every field is there, with its default when unset.
    out = DecisionRecord.from_dict(values).as_dict()
    out["time"] = format_time(out["time_us"])
    return out


@dataclass(slots=True, frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


def _encode_cursor(ts: int, decision_id: str) -> str:
    return base64.urlsafe_b64encode(f"{ts}:{decision_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, _, decision_id = raw.partition(":")
        return int(ts), decision_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise QueryError(
            f"cursor {cursor!r} is not one this API handed out; start again without it",
            field="cursor",
        ) from None


def list_decisions(
    conn: Connection,
    filters: Filters,
    *,
    cursor: str | None = None,
    limit: int = 50,
    oldest_first: bool = False,
) -> Page:
    """One page of decisions, newest first (``oldest_first``: for following new ones)."""
    if not 1 <= limit <= MAX_PAGE:
        raise QueryError(f"limit must be 1 to {MAX_PAGE}", field="limit")
    query = select(*_LIST_COLUMNS).where(*filters.where())
    key = tuple_(D.ts, D.decision_id)
    if cursor is not None:
        after = _decode_cursor(cursor)
        query = query.where(key > after if oldest_first else key < after)
    order = (D.ts, D.decision_id) if oldest_first else (D.ts.desc(), D.decision_id.desc())
    rows = conn.execute(query.order_by(*order).limit(limit + 1)).mappings().all()
    items = [record_dict(r) for r in rows[:limit]]
    last = _encode_cursor(items[-1]["time_us"], items[-1]["decision_id"]) if items else None
    if oldest_first:
        # A follower always gets where to go on from, even when nothing new came.
        return Page(items, last or cursor)
    return Page(items, last if len(rows) > limit else None)


def iter_decisions(
    conn: Connection, filters: Filters, *, batch: int = 1000, with_request: bool = False
) -> Iterator[dict[str, Any]]:
    """Every matching decision, newest first, in keyset batches (exports, replay)."""
    columns = [*_LIST_COLUMNS, D.request] if with_request else _LIST_COLUMNS
    after: tuple[int, str] | None = None
    while True:
        query = select(*columns).where(*filters.where())
        if after is not None:
            query = query.where(tuple_(D.ts, D.decision_id) < after)
        rows = conn.execute(
            query.order_by(D.ts.desc(), D.decision_id.desc()).limit(batch)
        ).mappings()
        count = 0
        for row in rows:
            count += 1
            item = record_dict(row)
            if with_request:
                item["request"] = bytes(row["request"]) if row["request"] is not None else None
            after = (item["time_us"], item["decision_id"])
            yield item
        if count < batch:
            return


def get_decision(conn: Connection, decision_id: str) -> dict[str, Any] | None:
    """One decision with its request snapshot (``request``: bytes or None)."""
    row = (
        conn.execute(select(*_LIST_COLUMNS, D.request).where(D.decision_id == decision_id))
        .mappings()
        .first()
    )
    if row is None:
        return None
    item = record_dict(row)
    item["request"] = bytes(row["request"]) if row["request"] is not None else None
    return item


@dataclass(slots=True, frozen=True)
class StoredPolicySet:
    version: str
    files: list[tuple[str, bytes]]
    settings: dict[str, Any]  # the authz settings it was served with


_SETS = PolicySetRow.__table__.c


def policy_set(conn: Connection, version: str | None = None) -> StoredPolicySet | None:
    """Policy-set ``version`` (None: the one first served last), if the trail holds it."""
    query = select(_SETS.version, _SETS.files, _SETS.settings)
    if version is None:
        query = query.order_by(_SETS.first_served_us.desc()).limit(1)
    else:
        query = query.where(_SETS.version == version)
    row = conn.execute(query).first()
    if row is None:
        return None
    return StoredPolicySet(row.version, policy_set_files(row.files), orjson.loads(row.settings))


def policy_set_settings(conn: Connection, version: str) -> dict[str, Any] | None:
    """The authz settings policy-set ``version`` was served with (None: not kept; sets
    kept before settings were are ``{}``)."""
    row = conn.execute(select(_SETS.settings).where(_SETS.version == version)).first()
    if row is None:
        return None
    settings: dict[str, Any] = orjson.loads(row.settings)
    return settings


# -- aggregates ------------------------------------------------------------------------
#
# Aggregates read the rollups when they can answer exactly: the per-minute series from
# decision_minutes (filters on the outcome only), top-N and edges over 6 hours or more
# from decision_hours (filters and groups on its dimensions only). The span is then
# widened to whole minutes or hours, and the answer says which span it covers and where
# it came from. Anything else scans decisions through its indexes.

_DENIED = func.sum(case((D.allowed == true(), 0), else_=1))
_ALLOWED = func.sum(case((D.allowed == true(), 1), else_=0))
H = DecisionHourRow.__table__.c
M = DecisionMinuteRow.__table__.c
HOURS_FROM = 6 * HOUR_US  # shorter spans scan decisions: few rows, and exact to the µs
# The filters decision_hours can apply, and the groups it has, as its columns.
_HOUR_FILTERS = {
    "allowed",
    "engine",
    "reason",
    "policy",
    "rule",
    "principal",
    "principal_prefix",
    "source_namespace",
    "namespace",
    "workload",
}
_HOUR_GROUPS: dict[str, Any] = {
    "principal": H.source_principal,
    "source_namespace": H.source_namespace,
    "policy": H.policy,
    "rule": H.policy_id,
    "reason": H.reason,
    "engine": H.engine,
    "namespace": H.destination_namespace,
    "workload": H.destination_workload,
}


@dataclass(slots=True, frozen=True)
class Aggregate:
    """An aggregate's rows, the span they cover (µs; None: open) and the table read."""

    rows: list[dict[str, Any]]
    since_us: int | None
    until_us: int | None
    source: str  # decisions, decision_minutes or decision_hours

    def as_dict(self) -> dict[str, Any]:
        return {
            "since": format_time(self.since_us) if self.since_us is not None else None,
            "until": format_time(self.until_us) if self.until_us is not None else None,
            "source": self.source,
        }


def _used(filters: Filters) -> set[str]:
    """The filters set, time aside (allowed=False is a filter; dry_run_flip=False is not)."""
    return {
        f.name
        for f in fields(filters)
        if f.name not in ("since_us", "until_us")
        and getattr(filters, f.name) is not None
        and not (f.name == "dry_run_flip" and not filters.dry_run_flip)
    }


def _widened(filters: Filters, unit: int) -> tuple[int | None, int | None]:
    since = None if filters.since_us is None else filters.since_us // unit * unit
    until = None if filters.until_us is None else -(-filters.until_us // unit) * unit
    return since, until


def _hours_answer(filters: Filters, now_us: int) -> bool:
    used = _used(filters)
    if used - _HOUR_FILTERS or ("rule" in used and filters.policy is None):
        return False
    if filters.since_us is None:
        return True
    until = filters.until_us if filters.until_us is not None else now_us
    return until - filters.since_us >= HOURS_FROM


def _hour_where(filters: Filters, since: int | None, until: int | None) -> list[Any]:
    out: list[Any] = []
    if since is not None:
        out.append(H.hour_us >= since)
    if until is not None:
        out.append(H.hour_us < until)
    if filters.allowed is not None:
        out.append(H.allowed == filters.allowed)
    for value, column in (
        (filters.engine, H.engine),
        (filters.reason, H.reason),
        (filters.policy, H.policy),
        (filters.principal, H.source_principal),
        (filters.source_namespace, H.source_namespace),
        (filters.namespace, H.destination_namespace),
        (filters.workload, H.destination_workload),
    ):
        if value is not None:
            out.append(column == value)
    if filters.rule is not None:
        out.append(H.policy_id == f"{filters.policy}[rules[{filters.rule}]]")
    if filters.principal_prefix is not None:
        prefix = filters.principal_prefix
        out.append(func.substr(H.source_principal, 1, len(prefix)) == prefix)
    return out


def series(
    conn: Connection, filters: Filters, *, bucket_s: int = 60, rollups: bool = True
) -> Aggregate:
    """Decisions and denials per ``bucket_s`` seconds: rows ``{time_us, allowed, denied}``."""
    if not 1 <= bucket_s <= 86400:
        raise QueryError("bucket must be 1 to 86400 seconds", field="bucket")
    width = bucket_s * 1_000_000
    if rollups and bucket_s % 60 == 0 and _used(filters) <= {"allowed"}:
        since, until = _widened(filters, MINUTE_US)
        bucket = (M.minute_us // literal(width)) * literal(width)
        where = [] if since is None else [M.minute_us >= since]
        if until is not None:
            where.append(M.minute_us < until)
        if filters.allowed is not None:
            where.append(M.allowed == filters.allowed)
        allowed = func.sum(case((M.allowed == true(), M.count), else_=0))
        denied = func.sum(case((M.allowed == true(), 0), else_=M.count))
        query = select(bucket.label("bucket"), allowed.label("allowed"), denied.label("denied"))
        query = query.where(*where).group_by(bucket).order_by(bucket)
        source = "decision_minutes"
    else:
        since, until = filters.since_us, filters.until_us
        bucket = (D.ts // literal(width)) * literal(width)
        query = (
            select(bucket.label("bucket"), _ALLOWED.label("allowed"), _DENIED.label("denied"))
            .where(*filters.where())
            .group_by(bucket)
            .order_by(bucket)
        )
        source = "decisions"
    rows = [
        {"time_us": int(r.bucket), "allowed": int(r.allowed), "denied": int(r.denied)}
        for r in conn.execute(query)
    ]
    return Aggregate(rows, since, until, source)


def top(
    conn: Connection,
    filters: Filters,
    *,
    by: str,
    limit: int = 10,
    now_us: int | None = None,
    rollups: bool = True,
) -> Aggregate:
    """The ``limit`` commonest values of ``by`` with their counts, most first."""
    column = GROUPS.get(by)
    if column is None:
        raise QueryError(f"by={by!r}: group by one of {', '.join(GROUPS)}", field="by")
    if not 1 <= limit <= MAX_PAGE:
        raise QueryError(f"limit must be 1 to {MAX_PAGE}", field="limit")
    now = now_us if now_us is not None else time.time_ns() // 1000
    if rollups and by in _HOUR_GROUPS and _hours_answer(filters, now):
        since, until = _widened(filters, HOUR_US)
        group = _HOUR_GROUPS[by]
        total = func.sum(H.count).label("n")
        query = (
            select(
                group.label("value"),
                total,
                func.sum(case((H.allowed == true(), H.count), else_=0)).label("allowed"),
                func.sum(case((H.allowed == true(), 0), else_=H.count)).label("denied"),
            )
            .where(*_hour_where(filters, since, until), group != "")
            .group_by(group)
            .order_by(total.desc(), group)
            .limit(limit)
        )
        source = "decision_hours"
    else:
        since, until = filters.since_us, filters.until_us
        count = func.count().label("n")
        query = (
            select(column.label("value"), count, _ALLOWED.label("allowed"), _DENIED.label("denied"))
            .where(*filters.where(), column.is_not(None))
            .group_by(column)
            .order_by(count.desc(), column)
            .limit(limit)
        )
        source = "decisions"
    rows = [
        {
            "value": r.value,
            "count": int(r.n),
            "allowed": int(r.allowed),
            "denied": int(r.denied),
        }
        for r in conn.execute(query)
    ]
    return Aggregate(rows, since, until, source)


def edges(
    conn: Connection,
    filters: Filters,
    *,
    limit: int = 200,
    now_us: int | None = None,
    rollups: bool = True,
) -> Aggregate:
    """Source principal → destination workload pairs with their allow/deny counts."""
    now = now_us if now_us is not None else time.time_ns() // 1000
    if rollups and _hours_answer(filters, now):
        since, until = _widened(filters, HOUR_US)
        total = func.sum(H.count).label("n")
        keys = (H.source_principal, H.destination_namespace, H.destination_workload)
        query = (
            select(
                *keys,
                total,
                func.sum(case((H.allowed == true(), H.count), else_=0)).label("allowed"),
                func.sum(case((H.allowed == true(), 0), else_=H.count)).label("denied"),
            )
            .where(*_hour_where(filters, since, until))
            .group_by(*keys)
            .order_by(total.desc(), *keys)
            .limit(limit)
        )
        source = "decision_hours"
    else:
        since, until = filters.since_us, filters.until_us
        count = func.count().label("n")
        keys = (D.source_principal, D.destination_namespace, D.destination_workload)
        # Ordered as the rollup orders its "" for NULL: the same edges make the cut.
        query = (
            select(*keys, count, _ALLOWED.label("allowed"), _DENIED.label("denied"))
            .where(*filters.where())
            .group_by(*keys)
            .order_by(count.desc(), *(func.coalesce(k, "") for k in keys))
            .limit(limit)
        )
        source = "decisions"
    rows = [
        {
            "source": r.source_principal or "(no principal)",
            "namespace": r.destination_namespace or None,
            "workload": r.destination_workload or None,
            "count": int(r.n),
            "allowed": int(r.allowed),
            "denied": int(r.denied),
        }
        for r in conn.execute(query)
    ]
    return Aggregate(rows, since, until, source)


def dry_run_policies(
    conn: Connection, filters: Filters, *, examples: int = 3
) -> list[dict[str, Any]]:
    """Each dry-run policy with how many decisions it would have flipped, and examples."""
    if _used(filters):
        source: Any = DryRunFlipRow.__table__.join(
            DecisionRow.__table__, and_(F.ts == D.ts, F.decision_id == D.decision_id)
        )
        where = filters.where()
    else:
        # Time alone: the flips answer without a join to the (much larger) decisions.
        source = DryRunFlipRow.__table__
        where = []
        if filters.since_us is not None:
            where.append(F.ts >= filters.since_us)
        if filters.until_us is not None:
            where.append(F.ts < filters.until_us)
    count = func.count().label("n")
    query = (
        select(F.engine, F.policy, F.to, count)
        .select_from(source)
        .where(*where)
        .group_by(F.engine, F.policy, F.to)
        .order_by(count.desc(), F.policy)
    )
    out = []
    for r in conn.execute(query):
        sample = conn.execute(
            select(F.decision_id)
            .select_from(source)
            .where(*where, F.engine == r.engine, F.policy == r.policy, F.to == r.to)
            .order_by(F.ts.desc())
            .limit(examples)
        ).scalars()
        out.append(
            {
                "engine": r.engine,
                "policy": r.policy,
                "to": r.to,
                "count": int(r.n),
                "examples": list(sample),
            }
        )
    return out


def count(conn: Connection, filters: Filters) -> int:
    query: Select[Any] = select(func.count()).select_from(DecisionRow.__table__)
    return int(conn.execute(query.where(*filters.where())).scalar() or 0)
