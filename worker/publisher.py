"""Coalesces job events from every in-flight job into one Redis round trip per loop turn.

An engine step yields one delta for each of up to N running requests at once; writing each
as its own pipeline would cost N round trips a step on the loop that also feeds the
engine. Instead `emit` and `add_text` only append to buffers, and one task flushes whatever
has gathered since its last write, so a busy step costs one pipeline and an idle one adds
no delay.

Text is coalesced too: a job's text that arrives while a write is in flight becomes ONE
delta event at the next flush. Idle, every engine delta is its own event at once; under
load (a slow Redis, a busy CPU) events grow instead of queueing, so every hop after this
one (Redis, the API's fan-out, SSE clients) does less work exactly when it is behind.
Event ids are given at flush time, in order, and the same chunks are what the job stores
in SQL, so replays from SQL match the live stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from storage import telemetry
from storage.events import JobEvent, JobEventStream
from worker.job_state import JobAttempt

log = logging.getLogger(__name__)


class EventPublisher:
    def __init__(self, stream: JobEventStream) -> None:
        self._stream = stream
        self._buffer: list[tuple[str, JobEvent]] = []
        # Jobs with text not yet turned into an event (insertion-ordered).
        self._dirty: dict[str, JobAttempt] = {}
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

    def add_text(
        self, state: JobAttempt, text: str, logprobs: list[dict[str, Any]] | None = None
    ) -> None:
        """New engine text (and its tokens' logprobs, if asked for) for a job; it becomes a
        delta event at the next flush."""
        if not state.pending and not state.pending_logprobs:
            state.pending_since = time.time()
        state.pending.append(text)
        if logprobs:
            state.pending_logprobs += logprobs
        self._dirty[state.job_id] = state
        self._idle.clear()
        self._wake.set()

    def settle(self, state: JobAttempt) -> None:
        """Turn the job's pending text into its delta event now (before its end)."""
        self._dirty.pop(state.job_id, None)
        if not state.pending:
            return
        text = "".join(state.pending)
        state.pending.clear()
        state.deltas.append(text)
        logprobs = None
        if state.logprobs is not None:
            logprobs, state.pending_logprobs = state.pending_logprobs, []
            state.logprobs.append(logprobs)
        event = JobEvent.delta(state.next_id(), text, state.pending_since, logprobs)
        self._buffer.append((state.job_id, event))

    async def drain(self) -> None:
        """Wait until everything emitted so far has been written."""
        await self._idle.wait()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for state in list(self._dirty.values()):
                self.settle(state)
            batch, self._buffer = self._buffer, []
            # Traced jobs' publication spans (storage/telemetry.py): per write, not per token.
            started = time.time_ns() if telemetry.enabled() else 0
            try:
                await self._stream.publish(batch)
                if started:
                    telemetry.published(batch, started)
            except Exception:
                # Redis is transport: a lost event is recovered from SQL on replay, and
                # must never fail the job that produced it.
                log.exception("publishing %d job events failed", len(batch))
            if not self._buffer and not self._dirty:
                self._idle.set()
