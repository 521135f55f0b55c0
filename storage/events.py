"""Job event streams: the token deltas and the end of every job, on Redis.

Each event goes two ways at once: appended to the job's Redis Stream, so a client that
reconnects can replay what it missed, and published on the job's channel, so live
subscribers get it without polling. A worker writes every event it has gathered with ONE
command (a Lua script that appends and publishes each), not two commands per event:
redis-py packs and parses each command in Python, which cost the worker about twice the
CPU per event (bench/README.md).

Event ids are `<attempt>-<seq>` (`EventId`) and double as the Redis Stream entry id. They are
deterministic: the worker numbers its events 1, 2, ... within an attempt, and the same
numbering can be rebuilt from the job row in SQL once the stream has expired. A later
attempt (after a worker died) has a larger id, and opens with a `retry` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

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
    # the job was still queued at its deadline and never ran: {"message", "code"}
    EXPIRED = "expired"
    RETRY = "retry"  # a new attempt starts over: discard text received so far

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset((EventType.DONE, EventType.ERROR, EventType.CANCELLED, EventType.EXPIRED))


class EventId(NamedTuple):
    """`<attempt>-<seq>`: a job event's id, on the wire and as its Redis Stream entry id.
    A tuple, so ids order as the events do (attempt first) at C speed on the hot path."""

    attempt: int
    seq: int

    def __str__(self) -> str:
        return f"{self.attempt}-{self.seq}"

    @classmethod
    def parse(cls, text: str) -> EventId:
        """`"2-17"` -> EventId(2, 17); ValueError for anything else."""
        attempt, sep, seq = text.partition("-")
        if not (
            sep and attempt.isascii() and attempt.isdigit() and seq.isascii() and seq.isdigit()
        ):
            raise ValueError(f"not an event id of the form <attempt>-<seq>: {text!r}")
        return cls(int(attempt), int(seq))

    def next(self) -> EventId:
        """The id of the event after this one in the same attempt."""
        return EventId(self.attempt, self.seq + 1)


# Before every event (ids start at 0-1 or 1-1; Redis refuses the stream entry id 0-0).
NO_EVENT = EventId(0, 0)
# The first event of a job no worker claimed (attempt 0): the `cancelled` the API writes
# when it cancels a queued job (or the `expired` of one past its deadline), as
# events_from_job rebuilds it.
FIRST_UNCLAIMED = EventId(0, 1)


class JobEvent:
    """One event of a job's stream. `data` read from the Redis Stream stays JSON text
    until something reads it: replays are forwarded to SSE clients as they came."""

    __slots__ = ("_data", "_json", "id", "type")

    def __init__(
        self,
        id: EventId | str,
        type: EventType,
        data: dict[str, Any] | None = None,
        *,
        data_json: str | None = None,
    ) -> None:
        self.id = id if isinstance(id, EventId) else EventId.parse(id)
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
        """`data` as JSON text (`json.dumps`'s defaults: the bytes SSE clients get)."""
        if self._json is None:
            self._json = json.dumps(self._data)
        return self._json

    @classmethod
    def delta(
        cls,
        id: EventId | str,
        text: str,
        ts: float | None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> JobEvent:
        """A `delta` event: `{"text", "ts"}`, with `"logprobs"` when asked for."""
        if logprobs is not None:
            return cls(id, EventType.DELTA, {"text": text, "ts": ts, "logprobs": logprobs})
        return cls(id, EventType.DELTA, {"text": text, "ts": ts})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, JobEvent):
            return NotImplemented
        return (self.id, self.type, self.data) == (other.id, other.type, other.data)

    __hash__ = None  # type: ignore[assignment]  # data is a dict: events are not hashable

    def __repr__(self) -> str:
        return f"JobEvent(id={str(self.id)!r}, type={self.type!r}, data={self.data!r})"

    def to_json(self) -> str:
        """What is published on the job's channel: `{"id", "type", "data"}`, as json.dumps
        writes it. Joined from `data_json` so a worker encodes each event's data once (id
        and type are digits, `-` and lowercase letters: nothing to escape)."""
        return f'{{"id": "{self.id}", "type": "{self.type.value}", "data": {self.data_json}}}'

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobEvent:
        obj = json.loads(raw)
        return cls(EventId.parse(obj["id"]), EventType(obj["type"]), obj["data"])


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
            args += (
                str(event.id),
                event.type.value,
                event.data_json,
                job_channel(job_id),
                event.to_json(),
                "1" if event.type.is_terminal else "",
            )
        refused = await self._append_and_publish(keys=keys, args=args)
        if refused:
            # Ids at or below their stream's last one: duplicate writes of events already
            # there (e.g. a cancel racing a worker). Replays stay consistent.
            log.debug("%d event appends refused (already in their streams)", refused)

    async def forget(self, job_id: str) -> None:
        """Drop a deleted job's stream (it would otherwise expire on its own)."""
        await self._redis.delete(job_stream(job_id))

    async def read_after(self, job_id: str, after: EventId) -> list[JobEvent] | None:
        """Events after `after` (exclusive) from the stream; None if there is no stream."""
        stream = job_stream(job_id)
        start = "-" if after == NO_EVENT else f"({after}"
        entries: Any = await self._redis.xrange(stream, min=start, max="+")
        if not entries and not await self._redis.exists(stream):
            return None
        events = []
        for entry_id, fields in entries:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            events.append(
                JobEvent(
                    EventId.parse(eid),
                    EventType(_text(fields, "type")),
                    data_json=_text(fields, "data"),
                )
            )
        return events


def _text(fields: dict[Any, Any], name: str) -> str:
    value = fields.get(name, fields.get(name.encode()))
    return value.decode() if isinstance(value, bytes) else str(value)


class JobEnd(Protocol):
    """What a job's terminal events are built from: its SQL row (`Job`) or what its worker
    is recording (`jobs_repo.JobOutcome`), which name these fields alike."""

    @property
    def finish_reason(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def tool_calls(self) -> list[dict[str, Any]] | None: ...
    @property
    def result_content(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def error_code(self) -> str | None: ...


def usage_data(prompt_tokens: int | None, completion_tokens: int | None) -> dict[str, int]:
    prompt = prompt_tokens or 0
    completion = completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def done_data(
    finish_reason: str | None, tool_calls: list[dict[str, Any]] | None, content: str | None
) -> dict[str, Any]:
    """A `done` event's data."""
    if tool_calls is None:
        return {"finish_reason": finish_reason}
    return {"finish_reason": finish_reason, "tool_calls": tool_calls, "content": content}


# Job.error_code values: the request's fault (answered 400) or Ferry's (5xx).
INVALID_REQUEST = "invalid_request"
SERVER_ERROR = "server_error"
# A job still queued at its deadline (Job.error_code of an `expired` job).
EXPIRED = "expired"


def error_data(message: str | None, code: str | None) -> dict[str, Any]:
    """An `error` event's data. A failure of unknown kind (a row from before error codes
    were kept) counts as Ferry's."""
    return {"message": message or "job failed", "code": code or SERVER_ERROR}


def terminal_events(status: JobStatus, end: JobEnd) -> list[tuple[EventType, dict[str, Any]]]:
    """The events that end a job with `status`, in order (none for a job not ended): the
    one builder behind the worker's live stream, the API's and the replay from SQL, so
    they always agree."""
    if status == JobStatus.SUCCEEDED:
        return [
            (EventType.USAGE, usage_data(end.prompt_tokens, end.completion_tokens)),
            (EventType.DONE, done_data(end.finish_reason, end.tool_calls, end.result_content)),
        ]
    if status == JobStatus.FAILED:
        return [(EventType.ERROR, error_data(end.error, end.error_code))]
    if status == JobStatus.CANCELLED:
        return [(EventType.CANCELLED, {})]
    if status == JobStatus.EXPIRED:
        return [(EventType.EXPIRED, {"message": end.error or "deadline passed", "code": EXPIRED})]
    return []


def events_from_job(job: Job) -> list[JobEvent]:
    """Rebuild a job's events from its SQL row, with the ids the worker used."""
    events: list[JobEvent] = []
    last = EventId(job.attempts, 0)

    def add(kind: EventType, data: dict[str, Any]) -> None:
        nonlocal last
        last = last.next()
        events.append(JobEvent(last, kind, data))

    if job.attempts > 1:
        add(EventType.RETRY, {"attempt": job.attempts})
    logprobs = job.logprobs
    for i, text in enumerate(job.deltas or []):
        if logprobs is not None and i < len(logprobs):
            add(EventType.DELTA, {"text": text, "logprobs": logprobs[i]})
        else:
            add(EventType.DELTA, {"text": text})
    for kind, data in terminal_events(job.status, job):
        add(kind, data)
    return events
