"""One error hierarchy, answered in OpenAI's envelope:
`{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match


class FerryError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(FerryError):
    status_code = 400


class Unauthorized(FerryError):
    status_code = 401
    code = "invalid_api_key"


class NotFound(FerryError):
    status_code = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, model: str, served: list[str] | None = None) -> None:
        super().__init__(
            f"The model `{model}` does not exist. {served_sentence(served or [])}", param="model"
        )


def served_sentence(served: list[str]) -> str:
    """What a model error adds: the ids a request may name."""
    if not served:
        return "No model is served yet: start a worker."
    return "Served models: " + ", ".join(f"`{name}`" for name in sorted(served)) + "."


class Conflict(FerryError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(FerryError):
    status_code = 413
    code = "payload_too_large"


class RateLimited(FerryError):
    """Over one of the key's limits (api/core/ratelimit.py): 429 with `Retry-After` and
    OpenAI's `x-ratelimit-*` headers. `type` says which limit, as OpenAI's does."""

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.type = kind
        self.headers = headers


class GenerationFailed(FerryError):
    """A job failed for a server-side reason (its worker gave up, its result could not be
    recorded, ...): not the request's fault."""

    status_code = 500
    type = "server_error"
    code = "generation_failed"


class DeadlineExpired(FerryError):
    """The job was still queued at its deadline and never ran: a gateway timeout (504),
    which OpenAI's SDKs treat as a timeout and retry (a retry makes a new job)."""

    status_code = 504
    type = "timeout_error"
    code = "expired"


def job_failure(message: str | None, code: str | None) -> FerryError:
    """The error a failed job answers with: 400 when the engine refused the request
    (`invalid_request`), 504 for one that expired unrun (`expired`), 500 for anything
    else (storage.events.error_data's codes)."""
    text = message or "generation failed"
    if code == "invalid_request":
        return InvalidRequest(text, code="generation_failed")
    if code == "expired":
        return DeadlineExpired(text)
    return GenerationFailed(text)


def stream_error(message: str | None, code: str | None) -> dict[str, Any]:
    """A failed job's error as a streamed OpenAI response carries it."""
    exc = job_failure(message, code)
    return error_body(exc.message, exc.type, exc.param, exc.code)


class ServiceUnavailable(FerryError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class ModelUnavailable(ServiceUnavailable):
    """No live worker serves the model (`model_unavailable`), or its backlog is full
    (`model_overloaded`): 503 with `Retry-After`, nothing stored."""

    code = "model_unavailable"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after)}


class Answered(Exception):
    """Raised by a dependency that already has the request's whole answer (a replay of
    an `Idempotency-Key`'s first answer): the route does not run, this is sent."""

    def __init__(self, response: Response) -> None:
        super().__init__("answered")
        self.response = response


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (`error_body`), in the OpenAPI document."""

    error: ErrorObject


ERROR_SCHEMA_REF = "#/components/schemas/ErrorResponse"

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field, a value, or something the model cannot take",
    401: "Missing or unknown API key",
    404: "No such object for this API key (or no such model)",
    409: "The object's state does not allow this (it has already ended)",
    413: "Request body (or uploaded file) too large",
    429: "Over one of the API key's limits (requests or tokens per minute, batch lines "
    "per day, queued jobs): retry after `Retry-After` seconds",
    500: "The job failed for a reason on the server's side",
    503: "No live worker serves the model (`model_unavailable`), its backlog is full "
    "(`model_overloaded`), or the answer did not come in time: retry after `Retry-After` "
    "seconds where given",
    504: "The job was still queued at its deadline (`deadline_seconds`, `Cancel-After`) "
    "and never ran (code `expired`)",
}


def merge_responses(*parts: dict[int | str, dict[str, Any]]) -> dict[int | str, dict[str, Any]]:
    """Several `responses=` dicts as one: entries for the same status are merged (their
    `headers` too), not replaced."""
    merged: dict[int | str, dict[str, Any]] = {}
    for part in parts:
        for status, entry in part.items():
            into = merged.setdefault(status, {})
            headers = {**into.get("headers", {}), **entry.get("headers", {})}
            into.update(entry)
            if headers:
                into["headers"] = headers
    return merged


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """A route's `responses=` for the errors it can answer: the error envelope, as JSON
    whatever the route's own media type (so no `model=`, which would take that one)."""
    content = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
    answers: dict[int | str, dict[str, Any]] = {
        code: {"description": _ERROR_DESCRIPTIONS[code], "content": content} for code in codes
    }
    if 429 in answers:
        answers[429]["headers"] = RATE_LIMIT_HEADERS
    if 503 in answers:
        answers[503]["headers"] = {
            "Retry-After": _header("Seconds to wait before retrying", "integer")
        }
    return answers


def _header(description: str, kind: str = "string") -> dict[str, Any]:
    return {"description": description, "schema": {"type": kind}}


# OpenAI's rate-limit headers (api/core/ratelimit.py), on a 429 and, for a key with such a
# limit, on every answer of a route that creates work.
RATE_LIMIT_HEADERS: dict[str, Any] = {
    "Retry-After": _header("Seconds to wait before retrying (429 only)", "integer"),
    "x-ratelimit-limit-requests": _header("The key's requests per minute", "integer"),
    "x-ratelimit-remaining-requests": _header("Requests left now", "integer"),
    "x-ratelimit-reset-requests": _header("Until the request budget is full again (`1s`)"),
    "x-ratelimit-limit-tokens": _header("The key's tokens per minute", "integer"),
    "x-ratelimit-remaining-tokens": _header("Tokens left now", "integer"),
    "x-ratelimit-reset-tokens": _header("Until the token budget is full again (`6m0s`)"),
}
# The same on an accepted request (for the limits the key has).
ACCEPTED_RATE_HEADERS = {k: v for k, v in RATE_LIMIT_HEADERS.items() if k != "Retry-After"}


def error_response(exc: FerryError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    if isinstance(exc, RateLimited | ModelUnavailable):
        headers = exc.headers
    return JSONResponse(
        error_body(exc.message, exc.type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


_LOC_NOISE = {
    "body",
    "query",
    "path",
    "header",
    "str",
    "int",
    "float",
    "bool",
    "list",
    "dict",
    "none",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    # Drop the request part and pydantic's union-member tags ("str", "list[str]", ...).
    loc = [
        str(p)
        for p in first.get("loc", ())
        if p not in _LOC_NOISE and "[" not in str(p) and "-" not in str(p)
    ]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "Request body is not valid JSON.", None
    not_an_object = first.get("type") in ("model_attributes_type", "dict_type", "model_type")
    if tuple(first.get("loc", ())) == ("body",) and not_an_object:
        return (
            "Request body must be a JSON object, sent with Content-Type: application/json."
        ), None
    message = first.get("msg", "Invalid request")
    return (f"{param}: {message}" if param else message), param


def _allowed_methods(request: Request) -> str:
    """Every method the path takes: Starlette's 405 names only the first route that
    matched the path, where `/v1/conversations` has one route for GET, another for POST."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match == Match.PARTIAL:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    async def on_ferry_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FerryError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, None), 400)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = exc.headers
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": _allowed_methods(request)}
        return JSONResponse(
            error_body(str(exc.detail), kind, None, None), exc.status_code, headers=headers
        )

    async def on_answered(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, Answered)
        return exc.response

    app.add_exception_handler(Answered, on_answered)
    app.add_exception_handler(FerryError, on_ferry_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
