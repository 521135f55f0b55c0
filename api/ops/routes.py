"""Operations: `/health`, `/ready` and `/metrics` (no API key: for load balancers,
orchestrators' probes and Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from api.core.deps import StateDep
from api.core.state import AppState
from api.ops.metrics import render_metrics
from storage.registry import Snapshot

router = APIRouter(tags=["operations"])


async def _checks(state: AppState) -> tuple[dict[str, Any], Snapshot | None]:
    """SQL and Redis, each answering or not; the registry as Redis has it."""
    checks: dict[str, Any] = {}
    try:
        async with state.db.read() as session:
            await session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    snap = None
    try:
        await state.redis.ping()
        snap = await state.registry.snapshot()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
    checks["workers"] = [
        {"id": w.worker_id, "model": w.model, "engine": w.engine, "in_flight": w.in_flight}
        for w in (snap.workers if snap else ())
    ]
    return checks, snap


def _answer(checks: dict[str, Any], ok: bool) -> JSONResponse:
    checks["status"] = "ok" if ok else "unavailable"
    return JSONResponse(checks, status_code=200 if ok else 503)


_REPORT: dict[str, Any] = {"content": {"application/json": {}}}


@router.get(
    "/health",
    responses={503: {"description": "SQL or Redis does not answer (the same report)", **_REPORT}},
)
async def health(state: StateDep) -> JSONResponse:
    """Liveness, for a load balancer: 200 when this process, SQL and Redis answer, 503
    (naming what failed) otherwise. No worker is needed; the live ones are listed."""
    checks, _ = await _checks(state)
    return _answer(checks, checks["database"] == "ok" and checks["redis"] == "ok")


@router.get(
    "/ready",
    responses={
        503: {
            "description": "SQL or Redis does not answer, or a model of FERRY_MODELS has no "
            "live worker (the same report)",
            **_REPORT,
        }
    },
)
async def ready(state: StateDep) -> JSONResponse:
    """Readiness: `/health`, and at least one live worker for every model declared in
    FERRY_MODELS (`models` gives each one's count). With none declared, ready when SQL
    and Redis answer."""
    checks, snap = await _checks(state)
    declared = state.catalog.declared
    checks["models"] = {name: snap.live_count(name) if snap else 0 for name in declared}
    ok = checks["database"] == "ok" and checks["redis"] == "ok" and all(checks["models"].values())
    return _answer(checks, ok)


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
