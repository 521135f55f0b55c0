"""Operations: `/health` and `/metrics` (no API key: for load balancers and Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from api.core.deps import StateDep
from api.ops.metrics import render_metrics

router = APIRouter(tags=["operations"])


@router.get(
    "/health",
    responses={
        503: {
            "description": "SQL or Redis does not answer (the same report)",
            "content": {"application/json": {}},
        }
    },
)
async def health(state: StateDep) -> JSONResponse:
    """200 when SQL and Redis answer, 503 otherwise; lists the live workers."""
    checks: dict[str, Any] = {}
    try:
        async with state.db.read() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        await state.redis.ping()
        workers = await state.registry.live_workers()
        checks["redis"] = "ok"
        checks["workers"] = [
            {"id": w.worker_id, "model": w.model, "engine": w.engine, "in_flight": w.in_flight}
            for w in workers
        ]
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
        checks["workers"] = []
    healthy = checks["database"] == "ok" and checks["redis"] == "ok"
    checks["status"] = "ok" if healthy else "unavailable"
    return JSONResponse(checks, status_code=200 if healthy else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
async def metrics(state: StateDep, request: Request) -> Response:
    """Prometheus text format: jobs, tokens and latencies per model (cluster-wide, the
    same on every replica), queue depth, workers' engines, this process's HTTP requests."""
    body = await render_metrics(state.redis, state.registry, request.app.state.http_metrics)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
