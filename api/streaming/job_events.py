"""A job's events for one subscriber: missed ones first, then live ones, exactly once.

Order of sources: subscribe to the live channel (confirmed), then read the Redis Stream
after the client's Last-Event-ID, then live events, skipping any already sent. When the
stream has expired (or Redis lost it) the job row in SQL rebuilds the same events with
the same ids. If a job ends in SQL but no terminal event arrives (its worker died while
it was being cancelled), the SQL row ends the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from api.core.db import Database
from api.streaming.event_hub import JobEventHub
from storage import telemetry
from storage.events import NO_EVENT, EventId, JobEvent, JobEventStream, events_from_job
from storage.models import JobStatus
from storage.repositories import jobs as jobs_repo

# What the generator yields while nothing happens, so the caller can send a keep-alive.
KEEPALIVE = None


@dataclass(frozen=True, slots=True)
class EventSources:
    hub: JobEventHub
    stream: JobEventStream
    db: Database


async def job_events(
    sources: EventSources,
    job_id: str,
    after: EventId | None,
    *,
    keepalive_seconds: float,
    max_seconds: float,
) -> AsyncIterator[JobEvent | None]:
    """Yield the job's events after `after`, ending with its terminal event.

    Yields None (KEEPALIVE) every `keepalive_seconds` of silence.
    """
    async for batch in job_event_batches(
        sources, job_id, after, keepalive_seconds=keepalive_seconds, max_seconds=max_seconds
    ):
        if batch is None:
            yield KEEPALIVE
            continue
        for event in batch:
            yield event


def job_event_batches(
    sources: EventSources,
    job_id: str,
    after: EventId | None,
    *,
    keepalive_seconds: float,
    max_seconds: float,
    traceparent: str | None = None,
) -> AsyncIterator[list[JobEvent] | None]:
    """`_job_event_batches`; given the job's `traceparent` (and tracing on), its delivery
    is a `ferry.sse` span of the job's trace."""
    batches = _job_event_batches(
        sources, job_id, after, keepalive_seconds=keepalive_seconds, max_seconds=max_seconds
    )
    if traceparent is None or not telemetry.enabled():
        return batches
    return telemetry.traced_batches(batches, job_id, traceparent)


async def _job_event_batches(
    sources: EventSources,
    job_id: str,
    after: EventId | None,
    *,
    keepalive_seconds: float,
    max_seconds: float,
) -> AsyncIterator[list[JobEvent] | None]:
    """`job_events`, a list at a time: every event that has arrived by the time the
    caller asks for more. A subscriber that falls behind (a busy API process, a slow
    client) then catches up in one write instead of one write per event; one that keeps
    up gets each event alone, at once. Lists are never empty; None is KEEPALIVE.
    """
    last = after or NO_EVENT
    deadline = time.monotonic() + max_seconds
    async with sources.hub.subscribe(job_id) as live:
        backlog = await _backlog(sources, job_id, last)
        ended = _through_terminal(backlog)
        if ended:
            yield ended
            last = ended[-1].id
            if ended[-1].type.is_terminal:
                return
        silence = _SilenceWatch(live, keepalive_seconds)
        try:
            while time.monotonic() < deadline:
                arrived = [live.get_nowait() if not live.empty() else await live.get()]
                while not live.empty():
                    arrived.append(live.get_nowait())
                batch: list[JobEvent] = []
                for event in arrived:
                    if event is None:  # the silence watch: only if nothing came with it
                        continue
                    order = event.id
                    if order <= last:
                        continue
                    if not _follows(last, order):
                        # A gap (a publish we missed): the stream has everything, read it.
                        for missed in await _backlog(sources, job_id, last):
                            if missed.id < order:
                                batch.append(missed)
                                last = missed.id
                    batch.append(event)
                    last = order
                    if event.type.is_terminal:
                        yield batch
                        return
                if batch:
                    silence.heard()
                    yield batch
                elif None in arrived:
                    ending = await _ended_in_sql(sources, job_id, last)
                    if ending:
                        yield ending
                        return
                    yield KEEPALIVE
        finally:
            silence.close()


class _SilenceWatch:
    """Puts None in a subscriber's queue once `seconds` pass with no events heard.

    One timer per quiet period: an `asyncio.timeout` around every wait for the next event
    was a large share of the API's CPU per event streamed (bench/README.md).
    """

    __slots__ = ("_handle", "_heard", "_loop", "_queue", "_seconds")

    def __init__(self, queue: asyncio.Queue[JobEvent | None], seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue
        self._seconds = seconds
        self._heard = self._loop.time()
        self._handle = self._loop.call_at(self._heard + seconds, self._check)

    def heard(self) -> None:
        """Events arrived: the silence starts again from now."""
        self._heard = self._loop.time()

    def _check(self) -> None:
        due = self._heard + self._seconds
        now = self._loop.time()
        if now >= due:
            self._queue.put_nowait(None)
            self._heard = now  # the next None after another full silence
            due = now + self._seconds
        self._handle = self._loop.call_at(due, self._check)

    def close(self) -> None:
        self._handle.cancel()


def _through_terminal(events: list[JobEvent]) -> list[JobEvent]:
    """The events up to and including the first terminal one."""
    for i, event in enumerate(events):
        if event.type.is_terminal:
            return events[: i + 1]
    return events


def _follows(last: EventId, order: EventId) -> bool:
    """Whether `order` comes right after `last`: the next in its attempt, or the first of a
    later attempt."""
    attempt, seq = order
    return (attempt == last.attempt and seq == last.seq + 1) or (
        attempt > last.attempt and seq == 1
    )


async def _backlog(sources: EventSources, job_id: str, last: EventId) -> list[JobEvent]:
    events = await sources.stream.read_after(job_id, last)
    if events is not None:
        return events
    async with sources.db.read() as session:
        job = await jobs_repo.get_job(session, job_id)
    if job is None or not job.status.is_terminal:
        return []
    return [e for e in events_from_job(job) if e.id > last]


async def _ended_in_sql(sources: EventSources, job_id: str, last: EventId) -> list[JobEvent]:
    """After a silence: if SQL says the job is over, the rest of its events from SQL."""
    async with sources.db.read() as session:
        job = await jobs_repo.get_job(session, job_id)
    if job is None or not job.status.is_terminal:
        return []
    worker_still_recording = (
        job.status == JobStatus.CANCELLED
        and job.deltas is None
        and job.lease_expires_at is not None
        and job.lease_expires_at.timestamp() > time.time()
    )
    if worker_still_recording:
        # Cancelled while running; its worker is alive and will record its output and
        # send `cancelled` itself. Wait another silence interval for it.
        return []
    pending = [e for e in events_from_job(job) if e.id > last]
    if pending and pending[-1].type.is_terminal:
        return pending
    # Our client already saw more than SQL knows (output the worker never recorded):
    # close with a terminal event numbered after what was sent.
    terminal = events_from_job(job)[-1]
    return [JobEvent(last.next(), terminal.type, terminal.data)]
