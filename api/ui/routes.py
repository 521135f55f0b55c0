"""`/ui/`: the web page's files, its settings (`/ui/config.json`), and `GET /` for a browser."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from api.core.deps import StateDep

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter()


class ServiceIndex(BaseModel):
    object: Literal["ferry"] = "ferry"
    ui: str = Field("/ui/", description="The web page")
    docs: str = Field("/docs", description="This document as Swagger UI (also `/redoc`)")
    openapi: str = Field("/openapi.json", description="This document")


@router.get(
    "/",
    tags=["ops"],
    response_model=ServiceIndex,
    responses={303: {"description": "Asked for HTML (a browser): sent to the web page, `/ui/`"}},
)
async def root(request: Request) -> Response | ServiceIndex:
    """Where things are. A browser (`Accept: text/html`) is sent to the web page. (PAI-EAS's
    `POST /` and WebSocket `/` are routes of their own.)"""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse("/ui/", status_code=303)
    return ServiceIndex()


@router.get("/ui/config.json", include_in_schema=False)
async def page_config(state: StateDep) -> dict[str, Any]:
    """What the page checks before sending (the API checks again): no secret in it."""
    settings = state.settings
    return {
        "auth": settings.auth,
        "image_max_bytes": settings.image_max_bytes,
        "image_max_per_request": settings.image_max_per_request,
        "max_request_bytes": settings.max_request_bytes,
        "batch_max_file_bytes": settings.batch_max_file_bytes,
    }


class PageFiles(StaticFiles):
    """The page's files, revalidated on every load (`no-cache`, answered 304 while
    unchanged): after an upgrade a browser never runs yesterday's scripts beside today's."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_page(app: FastAPI) -> None:
    """The routes above, then the files: `/ui/config.json` must match before the mount."""
    app.include_router(router)
    app.mount("/ui", PageFiles(directory=STATIC_DIR, html=True), name="ui")
