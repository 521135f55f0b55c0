"""Coalesces job events from every in-flight job into one Redis round trip per loop turn.

An engine step yields one delta for each of up to N running requests at once; writing each
as its own pipeline would cost N round trips a step on the loop that also feeds the
engine. Instead `emit` only appends to a buffer, and one task flushes whatever has
gathered since its last write, so a busy step costs one pipeline and an idle one adds
no delay.
"""

from __future__ import annotations

import asyncio
import logging

from storage.events import JobEvent, JobEventStream

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, stream: JobEventStream) -> None:
        self._stream = stream
        self._buffer: list[tuple[str, JobEvent]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()

    def emit(self, job_id: str, event: JobEvent) -> None:
        self._buffer.append((job_id, event))
        self._idle.clear()
        self._wake.set()

    async def drain(self) -> None:
        """Wait until everything emitted so far has been written."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._buffer = self._buffer, []
            try:
                await self._stream.publish(batch)
            except Exception:
                # Redis is transport: a lost event is recovered from SQL on replay, and
                # must never fail the job that produced it.
                log.exception("publishing %d job events failed", len(batch))
            if not self._buffer:
                self._idle.set()
