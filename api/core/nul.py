"""NUL (U+0000) in a request: a 400 before anything is stored.

PostgreSQL can keep no NUL in text or JSON, so a request carrying one would fail at its
INSERT, and in a group commit it would fail its neighbours' jobs too. `RefuseNul` checks
the path, the query and the body (a raw NUL byte, or JSON's `\\u0000` escape) before
the route runs; `find_nul` checks values that come another way (batch lines, WebSocket messages).
Multipart uploads are left to their own checks: a batch file's lines are checked one by one.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.core.errors import FerryError, InvalidRequest, error_response

NUL_MESSAGE = "contains a NUL character (U+0000), which Ferry cannot store"

# A backslash run before `u0000`: an escape when the run's length is odd.
_ESCAPES = re.compile(rb"(\\+)u0000")


def has_nul_escape(data: bytes) -> bool:
    """Whether JSON text holds a NUL, raw or escaped (`\\\\u0000` is a backslash and text)."""
    if b"\x00" in data:
        return True
    if b"u0000" not in data:
        return False
    return any(len(m.group(1)) % 2 for m in _ESCAPES.finditer(data))


def find_nul(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) holding a NUL in decoded JSON, or
    None. The path of a NUL in the top-level value itself is ""."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                return where
            found = find_nul(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = find_nul(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None


class RefuseNul:
    """ASGI middleware: 400 for a NUL in an HTTP request's path, query or body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        query = scope.get("query_string", b"")
        if "\x00" in scope["path"] or b"%00" in query or b"\x00" in query:
            await error_response(_url_error(scope["path"], query))(scope, receive, send)
            return
        content_type = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
        if content_type.startswith(b"multipart/"):
            await self.app(scope, receive, send)
            return
        # Read whole (the JSON routes read it whole anyway), then handed on unchanged.
        chunks: list[bytes] = []
        last: Message = {"type": "http.request", "body": b"", "more_body": False}
        try:
            while True:
                last = await receive()
                if last["type"] != "http.request":
                    break
                chunks.append(last.get("body", b""))
                if not last.get("more_body", False):
                    break
        except FerryError as exc:  # BodySizeLimit's 413, raised while the body streams in
            await error_response(exc)(scope, receive, send)
            return
        body = b"".join(chunks)
        if has_nul_escape(body):
            await error_response(_body_error(body))(scope, receive, send)
            return
        replay: list[Message] = [
            {"type": "http.request", "body": body, "more_body": False}
            if last["type"] == "http.request"
            else last
        ]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def _url_error(path: str, query: bytes) -> InvalidRequest:
    """The error naming the query parameter that holds the NUL (the path has no name)."""
    if "\x00" in path:
        return InvalidRequest(f"The request's path {NUL_MESSAGE}.")
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return InvalidRequest(f"`{name}` {NUL_MESSAGE}.", param=name)
    return InvalidRequest(f"The request's query {NUL_MESSAGE}.")


def _body_error(body: bytes) -> InvalidRequest:
    """The error naming the JSON field that holds the NUL, where the body is JSON."""
    try:
        where = find_nul(json.loads(body))
    except ValueError:
        where = None
    if where is None:
        return InvalidRequest(f"The request body {NUL_MESSAGE}.")
    return InvalidRequest(f"`{where}` {NUL_MESSAGE}.", param=where)
