"""Server-Sent Events: the bytes of every `text/event-stream` route (jobs, chat and
completions streams) are written here and nowhere else.

The format is WHATWG's: `field: value` lines, a blank line ends an event, a line opening
with `:` is a comment. Every payload is JSON from `json.dumps`, which escapes each control
character, so an event's data is always one `data:` line. Written directly rather than
through FastAPI's `ServerSentEvent`, a pydantic model and a `jsonable_encoder` pass per
event (bench/README.md); one write carries every event that arrived together.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

from fastapi.responses import StreamingResponse

from storage.events import EventType, JobEvent

# Sent after each quiet `sse_keepalive_seconds` so proxies keep the connection open.
KEEPALIVE = b": keep-alive\n\n"
# As FastAPI sends them for a streamed EventSourceResponse.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """`text/event-stream`. (FastAPI's EventSourceResponse as a route's response_class
    would make the route a generator of ServerSentEvent items.)"""

    media_type = "text/event-stream"


def openapi_content(data_description: str, *, job_events: bool = False) -> dict[str, Any]:
    """A route's `text/event-stream` content in the OpenAPI document: `itemSchema` (OpenAPI
    3.2's keyword, as FastAPI writes it for its own event streams) is one event."""
    properties: dict[str, Any] = {"data": {"type": "string", "description": data_description}}
    required = ["data"]
    if job_events:
        properties["event"] = {"type": "string", "enum": [t.value for t in EventType]}
        properties["id"] = {
            "type": "string",
            "description": "`<attempt>-<seq>`: resume after it with Last-Event-ID",
        }
        required += ["event", "id"]
    event = {"type": "object", "properties": properties, "required": required}
    return {"text/event-stream": {"itemSchema": event}}


def data(payload: dict[str, Any] | str) -> bytes:
    """An unnamed event, as OpenAI streams send them: `data: <JSON>`; a str goes as it is
    (`[DONE]`)."""
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def data_events(payloads: Iterable[dict[str, Any] | str]) -> bytes:
    """`data` events, in one write."""
    return b"".join(data(payload) for payload in payloads)


def job_events(batch: Iterable[JobEvent]) -> bytes:
    """Job events, in one write: each with its `id` (a client resumes with it as
    Last-Event-ID), its type as `event`, and its data."""
    return "".join(
        f"id: {e.id}\nevent: {e.type.value}\ndata: {e.data_json}\n\n" for e in batch
    ).encode()


async def job_event_writes(
    batches: AsyncIterator[list[JobEvent] | None],
) -> AsyncIterator[bytes]:
    """One write per batch of `api.streaming.job_events.job_event_batches` (None: a keep-alive)."""
    async for batch in batches:
        yield KEEPALIVE if batch is None else job_events(batch)
