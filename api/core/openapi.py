"""`/openapi.json`: FastAPI's document, with what the routes' decorators cannot say.

Clients are generated from it, so it states every answer a route can give: the error
envelope (`api.core.errors.ErrorResponse`) with the statuses each route declares, and no
422, which FastAPI adds to every route with parameters while Ferry answers a request that
fails validation with 400 (any route may answer 400: a NUL anywhere in a request is
refused). An event stream's `itemSchema` describes each event; FastAPI's
`schema: string` beside it would claim to describe the whole stream.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from api.core.errors import ErrorResponse, error_responses


def install_openapi(app: FastAPI) -> None:
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _amend(build())  # FastAPI's, cached in app.openapi_schema
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _amend(document: dict[str, Any]) -> None:
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            responses.pop("422", None)
            # Any route: a NUL in its path, query or body is a 400 (api.core.nul).
            responses.setdefault("400", error_responses(400)[400])
            for response in responses.values():
                stream = response.get("content", {}).get("text/event-stream", {})
                if "itemSchema" in stream:
                    stream.pop("schema", None)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error.pop("$defs", {}))
    schemas["ErrorResponse"] = error
