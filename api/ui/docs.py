"""`/docs` (Swagger UI) and `/redoc` (ReDoc): FastAPI's documentation pages, served from
the package's own files instead of FastAPI's, which load their scripts from a CDN."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

DOCS_DIR = Path(__file__).parent / "static" / "docs"

# Pages, not API operations: out of /openapi.json.
router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> FileResponse:
    return FileResponse(DOCS_DIR / "index.html", media_type="text/html")


@router.get("/redoc")
async def redoc() -> FileResponse:
    return FileResponse(DOCS_DIR / "redoc.html", media_type="text/html")
