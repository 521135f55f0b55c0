"""The batch feeder: sends batch lines to their model's bulk queue a window at a time.

Sending all 50,000 lines of a batch to Celery at once would let workers' task threads
fill up with bulk work, and an interactive job arriving then would wait for a thread to
come free. So the lines stay in SQL (jobs `queued`, `enqueued_at` NULL) and the feeder
keeps, per model, at most `batch_bulk_share` of the live workers' task threads busy with
them: the other threads (and engine slots) stay free for interactive jobs, which also run
at a better engine priority. Each pass tops the window up; workers wake the feeder when a
line ends (`BATCH_WAKE_CHANNEL`), so a freed slot is refilled within milliseconds.

A line is marked sent (`enqueued_at`) before its message goes out: if the process dies in
between, the reconciler finds it `queued` with no pending mark and sends it again, and
the worker's conditional claim makes a duplicate message harmless.
"""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.enqueue import JobQueue, QueuedJob
from storage.models import utcnow
from storage.registry import ModelRegistry
from storage.repositories import batches as batches_repo

# A worker that does not announce its threads gets this many batch lines at once.
_DEFAULT_WINDOW = 8
_WORKERS_CACHE_SECONDS = 1.0


class BatchFeeder:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        registry: ModelRegistry,
        queue: JobQueue,
        *,
        bulk_share: float,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._queue = queue
        self._share = bulk_share
        self._windows: dict[str, int] = {}
        self._windows_at = 0.0

    async def windows(self) -> dict[str, int]:
        """How many batch lines each model's live workers take at once."""
        if time.monotonic() - self._windows_at > _WORKERS_CACHE_SECONDS:
            windows: dict[str, int] = {}
            for beat in await self._registry.live_workers():
                slots = (max(1, int(beat.concurrency * self._share)) if beat.concurrency
                         else _DEFAULT_WINDOW)
                windows[beat.model] = windows.get(beat.model, 0) + slots
            self._windows, self._windows_at = windows, time.monotonic()
        return self._windows

    async def feed_once(self) -> int:
        """Top every model's window up; returns how many lines were sent."""
        windows = await self.windows()
        if not windows:
            return 0
        async with self._sessions() as session:
            models = await batches_repo.unsent_models(session)
            if not models:
                return 0
            outstanding = await batches_repo.outstanding_by_model(session)
        sent = 0
        for model in models:
            room = windows.get(model, 0) - outstanding.get(model, 0)
            if room > 0:
                sent += await self._send(model, room)
        return sent

    async def _send(self, model: str, room: int) -> int:
        async with self._sessions.begin() as session:
            jobs = await batches_repo.next_unsent(session, model, room)
            await batches_repo.mark_sent(session, [j.id for j in jobs], utcnow())
        if jobs:
            await self._queue.send_now(
                [QueuedJob(j.id, j.model, "bulk", j.priority) for j in jobs]
            )
        return len(jobs)
