"""`/docs` (Swagger UI) and `/redoc` (ReDoc): FastAPI's documentation pages, served from
the package's own files instead of FastAPI's, which load their scripts from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
DOCS_DIR = STATIC_DIR / "docs"
STATIC_MOUNT = "/ui"

# Pages, not API operations: out of /openapi.json.
router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> FileResponse:
    return FileResponse(DOCS_DIR / "index.html", media_type="text/html")


@router.get("/redoc")
async def redoc() -> FileResponse:
    return FileResponse(DOCS_DIR / "redoc.html", media_type="text/html")


def mount_static(app: FastAPI) -> None:
    """Serves `static/` at `/ui`, where the pages' scripts and styles are; a second call
    (the chat page's module mounts the same folder) leaves the first mount in place."""
    if any(getattr(route, "path", None) == STATIC_MOUNT for route in app.routes):
        return
    app.mount(STATIC_MOUNT, StaticFiles(directory=STATIC_DIR, html=True), name="ui")
