"""Job event streams: the token deltas and the end of every job, on Redis.

Each event goes two ways at once (one pipeline): appended to the job's Redis Stream, so a
client that reconnects can replay what it missed, and published on the job's channel, so
live subscribers get it without polling.

Event ids are `<attempt>-<seq>` and double as the Redis Stream entry id. They are
deterministic: the worker numbers its events 1, 2, ... within an attempt, and the same
numbering can be rebuilt from the job row in SQL once the stream has expired. A later
attempt (after a worker died) has a larger id, and opens with a `retry` event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from storage.keys import job_channel, job_stream
from storage.models import Job, JobStatus

log = logging.getLogger(__name__)


class EventType(StrEnum):
    DELTA = "delta"  # new output text: {"text", "ts"}
    USAGE = "usage"  # token counts: {"prompt_tokens", "completion_tokens", "total_tokens"}
    DONE = "done"  # the job succeeded: {"finish_reason"}
    ERROR = "error"  # the job failed: {"message"}
    CANCELLED = "cancelled"  # the job was cancelled
    RETRY = "retry"  # a new attempt starts over: discard text received so far

    @property
    def is_terminal(self) -> bool:
        return self in (EventType.DONE, EventType.ERROR, EventType.CANCELLED)


def parse_event_id(event_id: str) -> tuple[int, int]:
    """`"2-17"` -> (2, 17); raises ValueError for anything else."""
    attempt, _, seq = event_id.partition("-")
    return int(attempt), int(seq)


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: str
    type: EventType
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def order(self) -> tuple[int, int]:
        return parse_event_id(self.id)

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "type": self.type, "data": self.data})

    @classmethod
    def from_json(cls, raw: str | bytes) -> JobEvent:
        obj = json.loads(raw)
        return cls(id=obj["id"], type=EventType(obj["type"]), data=obj["data"])


class JobEventStream:
    """Writes and reads job events on Redis (stream for replay, channel for live)."""

    def __init__(self, redis: Redis, *, maxlen: int, ttl_seconds: int) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._ttl = ttl_seconds

    async def publish(self, batch: Sequence[tuple[str, JobEvent]]) -> None:
        """Append and publish many jobs' events in one round trip."""
        if not batch:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id, event in batch:
            stream = job_stream(job_id)
            pipe.xadd(
                stream,
                {"type": event.type.value, "data": json.dumps(event.data)},
                id=event.id,
                maxlen=self._maxlen,
                approximate=True,
            )
            pipe.publish(job_channel(job_id), event.to_json())
            if event.type.is_terminal:
                pipe.expire(stream, self._ttl)
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                # An id at or below the stream's last one: a duplicate write of an event
                # already there (e.g. a cancel racing a worker). Replays stay consistent.
                log.debug("event append refused: %s", result)

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
            events.append(
                JobEvent(
                    id=eid,
                    type=EventType(_text(fields, "type")),
                    data=json.loads(_text(fields, "data")),
                )
            )
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
    for text in job.deltas or []:
        add(EventType.DELTA, {"text": text})
    status = job.job_status
    if status == JobStatus.SUCCEEDED:
        add(EventType.USAGE, usage_data(job.prompt_tokens, job.completion_tokens or 0))
        add(EventType.DONE, {"finish_reason": job.finish_reason})
    elif status == JobStatus.FAILED:
        add(EventType.ERROR, {"message": job.error or "job failed"})
    elif status == JobStatus.CANCELLED:
        add(EventType.CANCELLED, {})
    return events
