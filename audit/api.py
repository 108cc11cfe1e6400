"""The audit query API (FastAPI, OpenAPI at ``/docs``) and the page that uses it.

Every endpoint reads: the store is opened read-only (SQLite ``query_only``,
PostgreSQL ``default_transaction_read_only``) and there is no endpoint that writes.
Filters are URL parameters (see :data:`audit.store.queries.FILTERS`), AND-ed, so a view
can be shared as a link; an unknown parameter is a 400 naming it, never ignored.

``explain`` and ``replay`` re-run the policy engines, which live in ``authz``; the
process wiring hands them in as callables (this package imports neither ``authz``
nor ``identity``).
"""

from __future__ import annotations

import base64
import csv
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Histogram
from sqlalchemy import Connection

from audit.errors import AuditError, QueryError, StoreError
from audit.request_document import request_document
from audit.store import queries
from audit.store.database import AuditDatabase
from audit.store.ingest import COLUMNS, store_errors
from audit.store.queries import FILTERS, GROUPS, Filters, StoredPolicySet

__all__ = [
    "EXPORT_COLUMNS",
    "Explain",
    "Replay",
    "ReplayError",
    "SettingsLookup",
    "create_audit_app",
]

T = TypeVar("T")
PAGE = Path(__file__).parent / "page"
# explain(record with its request bytes, its policy set if the trail keeps it) → report
Explain = Callable[[dict[str, Any], StoredPolicySet | None], dict[str, Any]]
# The authz settings a policy-set version was served with (None: the trail does not keep them).
SettingsLookup = Callable[[str], dict[str, Any] | None]
# replay(candidate directory, recorded decisions with their requests, the settings each
# decision's policy-set version was served with, at most this many decisions) → report
# (with ``truncated`` when more matched)
Replay = Callable[[str, Iterator[dict[str, Any]], SettingsLookup, int], dict[str, Any]]
# CSV columns: the record's time, its columns, and its lists as space-separated text.
EXPORT_COLUMNS = ("time", *COLUMNS, "audit_policy_ids", "dry_run_flips")
_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 10.0)
_REPLAY_LIMIT = 100_000


class ReplayError(AuditError):
    """A replay request that cannot run (a directory not allowed, policies that do not load)."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _filters_dependency(extra: frozenset[str]) -> Callable[..., Filters]:
    """Parse the filters of the request's URL; ``extra`` are the endpoint's own parameters."""

    def parse(
        request: Request,
        since: Annotated[str | None, Query(description=FILTERS["since"])] = None,
        until: Annotated[str | None, Query(description=FILTERS["until"])] = None,
        allowed: Annotated[str | None, Query(description=FILTERS["allowed"])] = None,
        engine: Annotated[str | None, Query(description=FILTERS["engine"])] = None,
        reason: Annotated[str | None, Query(description=FILTERS["reason"])] = None,
        policy: Annotated[str | None, Query(description=FILTERS["policy"])] = None,
        rule: Annotated[str | None, Query(description=FILTERS["rule"])] = None,
        principal: Annotated[str | None, Query(description=FILTERS["principal"])] = None,
        principal_prefix: Annotated[
            str | None, Query(description=FILTERS["principal_prefix"])
        ] = None,
        source_namespace: Annotated[
            str | None, Query(description=FILTERS["source_namespace"])
        ] = None,
        namespace: Annotated[str | None, Query(description=FILTERS["namespace"])] = None,
        workload: Annotated[str | None, Query(description=FILTERS["workload"])] = None,
        service: Annotated[str | None, Query(description=FILTERS["service"])] = None,
        method: Annotated[str | None, Query(description=FILTERS["method"])] = None,
        path_prefix: Annotated[str | None, Query(description=FILTERS["path_prefix"])] = None,
        status: Annotated[str | None, Query(description=FILTERS["status"])] = None,
        dry_run_flip: Annotated[str | None, Query(description=FILTERS["dry_run_flip"])] = None,
        decision_id: Annotated[str | None, Query(description=FILTERS["decision_id"])] = None,
        version: Annotated[str | None, Query(description=FILTERS["version"])] = None,
    ) -> Filters:
        params = request.query_params
        for name in params:
            if name not in FILTERS and name not in extra:
                raise QueryError(
                    f"unknown parameter {name!r}; filters are {', '.join(FILTERS)}"
                    + (f", and this endpoint takes {', '.join(sorted(extra))}" if extra else ""),
                    field=name,
                )
            if len(params.getlist(name)) > 1:
                raise QueryError(f"{name} is given more than once", field=name)
        return Filters.parse(
            {name: params[name] for name in params if name in FILTERS}, now_us=_now_us()
        )

    return parse


def create_audit_app(
    db: AuditDatabase,
    *,
    registry: CollectorRegistry,
    explain: Explain | None = None,
    replay: Replay | None = None,
) -> FastAPI:
    app = FastAPI(
        title="meshward audit",
        description="Every authorization decision meshward made: who was denied what, by "
        "which policy and rule, what a dry-run policy would flip, and what a candidate "
        "policy change would deny. Read-only.",
        version="1",
    )
    seconds = Histogram(
        "meshward_audit_query_seconds",
        "Time to answer an audit API request, by endpoint",
        ["endpoint"],
        registry=registry,
        buckets=_SECONDS_BUCKETS,
    )

    @app.exception_handler(QueryError)
    def bad_query(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)

    @app.exception_handler(ReplayError)
    def bad_replay(request: Request, exc: ReplayError) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": "policies"}, status_code=400)

    @app.exception_handler(StoreError)
    def store_down(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503)

    def run(endpoint: str, query: Callable[[Connection], T]) -> T:
        started = time.perf_counter()
        try:
            with store_errors(db, "reading the audit trail"), db.engine.connect() as conn:
                return query(conn)
        finally:
            seconds.labels(endpoint).observe(time.perf_counter() - started)

    api = APIRouter(prefix="/v1")
    listing = Depends(_filters_dependency(frozenset({"cursor", "limit", "order"})))
    aggregate_params = frozenset({"bucket", "by", "limit"})
    aggregated = Depends(_filters_dependency(aggregate_params))

    @api.get("/decisions", summary="Decisions matching the filters, newest first")
    def decisions(
        filters: Filters = listing,
        cursor: Annotated[str | None, Query(description="next_cursor of the page before")] = None,
        limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50,
        order: Annotated[str, Query(pattern="^(newest|oldest)$")] = "newest",
    ) -> dict[str, Any]:
        page = run(
            "decisions",
            lambda conn: queries.list_decisions(
                conn, filters, cursor=cursor or None, limit=limit, oldest_first=order == "oldest"
            ),
        )
        return {
            "items": page.items,
            "next_cursor": page.next_cursor,
            "filters": filters.as_params(),
        }

    export_filters = Depends(_filters_dependency(frozenset({"format", "include_request"})))

    @api.get(
        "/decisions/export",
        summary="Every decision matching the filters, as CSV or JSON lines",
        response_class=Response,
    )
    def export(
        filters: Filters = export_filters,
        format: Annotated[str, Query(pattern="^(csv|jsonl)$")] = "jsonl",
        include_request: Annotated[
            bool, Query(description="jsonl: add each request snapshot (base64 protobuf)")
        ] = False,
    ) -> StreamingResponse:
        def rows() -> Iterator[bytes]:
            with store_errors(db, "reading the audit trail"), db.engine.connect() as conn:
                items = queries.iter_decisions(conn, filters, with_request=include_request)
                if format == "csv":
                    yield from _csv(items)
                else:
                    for item in items:
                        if include_request:
                            blob = item["request"]
                            item["request"] = base64.b64encode(blob).decode() if blob else None
                        yield orjson.dumps(item) + b"\n"

        media = "text/csv" if format == "csv" else "application/x-ndjson"
        name = f"meshward-decisions.{format}"
        return StreamingResponse(
            rows(),
            media_type=media,
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    @api.get("/decisions/{decision_id}", summary="One decision, with its stored request")
    def decision(decision_id: str) -> dict[str, Any]:
        item = run("decision", lambda conn: queries.get_decision(conn, decision_id))
        if item is None:
            raise _not_found(decision_id)
        item["request"] = request_document(item["request"])
        return item

    @api.get(
        "/decisions/{decision_id}/explain",
        summary="Why a decision was made: its request against the policy set that decided it",
    )
    def explain_decision(decision_id: str) -> dict[str, Any]:
        def load(conn: Connection) -> tuple[dict[str, Any] | None, StoredPolicySet | None]:
            item = queries.get_decision(conn, decision_id)
            version = item.get("policy_set_version") if item else None
            return item, queries.policy_set(conn, version) if version else None

        item, stored = run("explain", load)
        if item is None:
            raise _not_found(decision_id)
        if explain is None:
            return {"decision": item | {"request": request_document(item["request"])}}
        return explain(item, stored)

    @api.get(
        "/policy-sets/{version}",
        summary="A served policy set: its files and the authz settings it was served with",
    )
    def policy_set(version: str) -> dict[str, Any]:
        stored = run("policy-set", lambda conn: queries.policy_set(conn, version))
        if stored is None:
            raise HTTPException(404, f"no policy set {version} in the audit trail")
        return {
            "version": stored.version,
            "files": [name for name, _ in stored.files],
            "settings": stored.settings,
        }

    @api.get("/aggregates/series", summary="Allowed and denied decisions per time bucket")
    def series(
        filters: Filters = aggregated,
        bucket: Annotated[int, Query(ge=1, le=86400, description="seconds")] = 60,
    ) -> dict[str, Any]:
        scoped = filters.with_default_span(_now_us())
        found = run("series", lambda conn: queries.series(conn, scoped, bucket_s=bucket))
        return {"bucket_s": bucket, "points": found.rows, **_covered(found, scoped)}

    @api.get("/aggregates/top", summary="The commonest values of one field, with counts")
    def top(
        filters: Filters = aggregated,
        by: Annotated[str, Query(description=f"one of {', '.join(GROUPS)}")] = "principal",
        limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 10,
    ) -> dict[str, Any]:
        scoped = filters.with_default_span(_now_us())
        found = run("top", lambda conn: queries.top(conn, scoped, by=by, limit=limit))
        return {"by": by, "rows": found.rows, **_covered(found, scoped)}

    @api.get("/aggregates/edges", summary="Source → destination pairs with allow/deny counts")
    def edges(
        filters: Filters = aggregated,
        limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 200,
    ) -> dict[str, Any]:
        scoped = filters.with_default_span(_now_us())
        found = run("edges", lambda conn: queries.edges(conn, scoped, limit=limit))
        return {"edges": found.rows, **_covered(found, scoped)}

    @api.get(
        "/aggregates/dry-run",
        summary="Dry-run policies and how many decisions each would have flipped",
    )
    def dry_run(filters: Filters = aggregated) -> dict[str, Any]:
        scoped = filters.with_default_span(_now_us())
        rows = run("dry-run", lambda conn: queries.dry_run_policies(conn, scoped))
        return {"policies": rows, "filters": scoped.as_params()}

    replay_filters = Depends(_filters_dependency(frozenset({"policies", "limit"})))

    @api.get(
        "/replay",
        summary="Re-evaluate recorded requests against a candidate policy directory",
    )
    def replay_decisions(
        policies: Annotated[str, Query(description="a policy directory on this server")],
        filters: Filters = replay_filters,
        limit: Annotated[int, Query(ge=1, le=_REPLAY_LIMIT)] = 10_000,
    ) -> dict[str, Any]:
        if replay is None:
            raise ReplayError("this audit server has no policy engines to replay with")
        scoped = filters.with_default_span(_now_us())

        def records(conn: Connection) -> dict[str, Any]:
            items = queries.iter_decisions(conn, scoped, with_request=True)
            return replay(
                policies, items, lambda version: queries.policy_set_settings(conn, version), limit
            )

        report = run("replay", records)
        return report | {"filters": scoped.as_params(), "limit": limit}

    app.include_router(api)
    app.mount("/page", StaticFiles(directory=PAGE), name="page")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(PAGE / "index.html", media_type="text/html")

    return app


def _covered(found: queries.Aggregate, filters: Filters) -> dict[str, Any]:
    """The filters asked, and the span the answer covers (rollups widen it)."""
    return {"filters": filters.as_params(), "covers": found.as_dict()}


def _not_found(decision_id: str) -> HTTPException:
    return HTTPException(404, f"no decision {decision_id} in the audit trail")


def _csv(items: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    buffer = io.StringIO()
    out = csv.writer(buffer)
    out.writerow(EXPORT_COLUMNS)
    for n, item in enumerate(items):
        row = [item.get(c) for c in EXPORT_COLUMNS]
        row[EXPORT_COLUMNS.index("audit_policy_ids")] = " ".join(item["audit_policy_ids"])
        row[EXPORT_COLUMNS.index("dry_run_flips")] = " ".join(
            f"{f['policy']}->{f['to']}" for f in item["dry_run_flips"]
        )
        out.writerow(["" if v is None else v for v in row])
        if n % 500 == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()
