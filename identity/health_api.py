"""``/live``, ``/ready`` and ``/metrics`` as a FastAPI router, for any meshward process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["ReadyCheck", "health_router"]

# Returns (ready, details); details explain what is not ready.
ReadyCheck = Callable[[], tuple[bool, dict[str, Any]]]


def health_router(registry: CollectorRegistry, ready: ReadyCheck) -> APIRouter:
    router = APIRouter()

    @router.get("/live", include_in_schema=False)
    def live() -> dict[str, str]:
        return {"status": "live"}

    @router.get("/ready", include_in_schema=False)
    def is_ready() -> JSONResponse:
        ok, details = ready()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", **details}, status_code=200 if ok else 503
        )

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
