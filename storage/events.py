"""Job event streams: the token deltas and the end of every job, on Redis.

Each event goes two ways at once: appended to the job's Redis Stream, so a client that
reconnects can replay what it missed, and published on the job's channel, so live
subscribers get it without polling. A worker writes every event it has gathered with ONE
command (a Lua script that appends and publishes each), not two commands per event:
redis-py packs and parses each command in Python, which cost the worker about twice the
CPU per event (bench/README.md).

Event ids are `<attempt>-<seq>` and double as the Redis Stream entry id. They are
deterministic: the worker numbers its events 1, 2, ... within an attempt, and the same
numbering can be rebuilt from the job row in SQL once the stream has expired. A later
attempt (after a worker died) has a larger id, and opens with a `retry` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from enum import StrEnum
from json.encoder import encode_basestring_ascii
from typing import Any

from redis.asyncio import Redis

from storage.keys import job_channel, job_stream
from storage.models import Job, JobStatus

log = logging.getLogger(__name__)


class EventType(StrEnum):
    DELTA = "delta"  # new output text: {"text", "ts"} (+ "logprobs" when asked for)
    USAGE = "usage"  # token counts: {"prompt_tokens", "completion_tokens", "total_tokens"}
    # the job succeeded: {"finish_reason"}, and when the reply calls tools, "tool_calls"
    # and "content" (the reply without the tool-call text)
    DONE = "done"
    ERROR = "error"  # the job failed: {"message", "code"} (code: Job.error_code)
    CANCELLED = "cancelled"  # the job was cancelled
    RETRY = "retry"  # a new attempt starts over: discard text received so far

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset((EventType.DONE, EventType.ERROR, EventType.CANCELLED))


def parse_event_id(event_id: str) -> tuple[int, int]:
    """`"2-17"` -> (2, 17); raises ValueError for anything else."""
    attempt, _, seq = event_id.partition("-")
    return int(attempt), int(seq)


# Event type by wire value, without the Enum call's overhead (once per token streamed).
_TYPES = {kind.value: kind for kind in EventType}
# The shape `JobEvent.to_json` writes (and workers publish): id, type, then the data.
_HEAD, _TYPE, _DATA = '{"id": "', '", "type": "', '", "data": '


class JobEvent:
    """One event of a job's stream. `data` is decoded from the wire only when something
    reads it: the API forwards most events to SSE clients as they came (`data_json`), and
    decoding and encoding again was a large share of its CPU while streaming
    (bench/README.md)."""

    __slots__ = ("_data", "_json", "id", "type")

    def __init__(self, id: str, type: EventType, data: dict[str, Any] | None = None, *,
                 data_json: str | None = None) -> None:
        self.id = id
        self.type = type
        self._data = data if data is not None or data_json is not None else {}
        self._json = data_json

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            assert self._json is not None
            self._data = json.loads(self._json)
        return self._data

    @property
    def data_json(self) -> str:
        """`data` as JSON text."""
        if self._json is None:
            self._json = json.dumps(self._data)
        return self._json

    @classmethod
    def delta(cls, id: str, text: str, ts: float | None,
              logprobs: list[dict[str, Any]] | None = None) -> JobEvent:
        """A `delta` event, its JSON written directly: what `json.dumps` gives for
        `{"text": text, "ts": ts}` at a quarter of its cost (once per event a worker
        publishes). With logprobs (asked for): `{"text", "ts", "logprobs"}`."""
        if logprobs is not None:
            return cls(id, EventType.DELTA, {"text": text, "ts": ts, "logprobs": logprobs})
        return cls(id, EventType.DELTA, {"text": text, "ts": ts},
                   data_json=f'{{"text": {encode_basestring_ascii(text)}, "ts": '
                             f'{"null" if ts is None else repr(ts)}}}')

    @property
    def order(self) -> tuple[int, int]:
        return parse_event_id(self.id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobEvent):
            return NotImplemented
        return (self.id, self.type, self.data) == (other.id, other.type, other.data)

    __hash__ = None  # type: ignore[assignment]  # data is a dict: events are not hashable

    def __repr__(self) -> str:
        return f"JobEvent(id={self.id!r}, type={self.type!r}, data={self.data!r})"

    def to_json(self) -> str:
        return f"{_HEAD}{self.id}{_TYPE}{self.type.value}{_DATA}{self.data_json}}}"

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobEvent:
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith(_HEAD) and text.endswith("}"):
            # What Ferry publishes: split it, leaving the data encoded until it is read.
            type_at = text.find(_TYPE, len(_HEAD))
            data_at = text.find(_DATA, type_at + len(_TYPE))
            kind = _TYPES.get(text[type_at + len(_TYPE):data_at])
            if type_at > 0 and data_at > 0 and kind is not None:
                return cls(text[len(_HEAD):type_at], kind,
                           data_json=text[data_at + len(_DATA):-1])
        obj = json.loads(text)
        return cls(id=obj["id"], type=EventType(obj["type"]), data=obj["data"])


# KEYS: one stream per event. ARGV: maxlen, ttl, then for each event its id, type, data
# (JSON), channel, what to publish (`JobEvent.to_json()`: the one place that shape is
# written) and "1" if the stream expires after it. Returns how many appends the stream
# refused (an id not above its last: a duplicate; published all the same, subscribers drop
# repeats). One Redis server, not a cluster: the streams may live on different slots.
_APPEND_AND_PUBLISH = """
local refused = 0
for i = 1, #KEYS do
  local a = 2 + (i - 1) * 6
  local added = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], ARGV[a + 1],
                            'type', ARGV[a + 2], 'data', ARGV[a + 3])
  if type(added) == 'table' and added.err then
    refused = refused + 1
  end
  redis.call('PUBLISH', ARGV[a + 4], ARGV[a + 5])
  if ARGV[a + 6] == '1' then
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  end
end
return refused
"""


class JobEventStream:
    """Writes and reads job events on Redis (stream for replay, channel for live)."""

    def __init__(self, redis: Redis, *, maxlen: int, ttl_seconds: int) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._ttl = ttl_seconds
        self._append_and_publish = redis.register_script(_APPEND_AND_PUBLISH)

    async def publish(self, batch: Sequence[tuple[str, JobEvent]]) -> None:
        """Append and publish many jobs' events with one command (one round trip)."""
        if not batch:
            return
        keys: list[str] = []
        args: list[str | int] = [self._maxlen, self._ttl]
        for job_id, event in batch:
            keys.append(job_stream(job_id))
            args += (event.id, event.type.value, event.data_json, job_channel(job_id),
                     event.to_json(), "1" if event.type.is_terminal else "")
        refused = await self._append_and_publish(keys=keys, args=args)
        if refused:
            # Ids at or below their stream's last one: duplicate writes of events already
            # there (e.g. a cancel racing a worker). Replays stay consistent.
            log.debug("%d event appends refused (already in their streams)", refused)

    async def read_after(self, job_id: str, after: str | None) -> list[JobEvent] | None:
        """Events after `after` (exclusive) from the stream; None if there is no stream."""
        stream = job_stream(job_id)
        start = f"({after}" if after else "-"
        entries: Any = await self._redis.xrange(stream, min=start, max="+")
        if not entries and not await self._redis.exists(stream):
            return None
        events = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            events.append(JobEvent(eid, EventType(_text(fields, "type")),
                                   data_json=_text(fields, "data")))
        return events


def _text(fields: dict[Any, Any], name: str) -> str:
    value = fields.get(name, fields.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else str(value)


def usage_data(prompt_tokens: int | None, completion_tokens: int) -> dict[str, int]:
    prompt = prompt_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def done_data(finish_reason: str | None, tool_calls: list[dict[str, Any]] | None,
              content: str | None) -> dict[str, Any]:
    """A `done` event's data."""
    if tool_calls is None:
        return {"finish_reason": finish_reason}
    return {"finish_reason": finish_reason, "tool_calls": tool_calls, "content": content}


# Job.error_code values: the request's fault (answered 400) or Ferry's (5xx).
INVALID_REQUEST = "invalid_request"
SERVER_ERROR = "server_error"


def error_data(message: str | None, code: str | None) -> dict[str, Any]:
    """An `error` event's data. A failure of unknown kind (a row from before error codes
    were kept) counts as Ferry's."""
    return {"message": message or "job failed", "code": code or SERVER_ERROR}


def events_from_job(job: Job) -> list[JobEvent]:
    """Rebuild a finished job's events from its SQL row, with the ids the worker used."""
    attempt = job.attempts
    events: list[JobEvent] = []
    seq = 0

    def add(kind: EventType, data: dict[str, Any]) -> None:
        nonlocal seq
        seq += 1
        events.append(JobEvent(f"{attempt}-{seq}", kind, data))

    if attempt > 1:
        add(EventType.RETRY, {"attempt": attempt})
    logprobs = job.logprobs
    for i, text in enumerate(job.deltas or []):
        if logprobs is not None and i < len(logprobs):
            add(EventType.DELTA, {"text": text, "logprobs": logprobs[i]})
        else:
            add(EventType.DELTA, {"text": text})
    status = job.status
    if status == JobStatus.SUCCEEDED:
        add(EventType.USAGE, usage_data(job.prompt_tokens, job.completion_tokens or 0))
        add(EventType.DONE, done_data(job.finish_reason, job.tool_calls, job.result_content))
    elif status == JobStatus.FAILED:
        add(EventType.ERROR, error_data(job.error, job.error_code))
    elif status == JobStatus.CANCELLED:
        add(EventType.CANCELLED, {})
    return events
