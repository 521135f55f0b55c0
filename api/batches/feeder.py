"""The batch feeder: sends batch lines to their model's bulk queue a window at a time.

Sending all 50,000 lines of a batch to Celery at once would let workers' task threads
fill up with bulk work, and an interactive job arriving then would wait for a thread to
come free. So the lines stay in SQL (jobs `queued`, `enqueued_at` NULL) and the feeder
keeps, per model, at most `batch_bulk_share` of the live workers' task threads busy with
them: the other threads (and engine slots) stay free for interactive jobs, which also run
at a better engine priority. While a model has interactive jobs in flight (and for
`batch_interactive_cooldown_seconds` after), the share drops to `batch_bulk_share_busy`:
on a small machine a full bulk window makes every engine step and every process slower,
and interactive first tokens with it. Each pass tops the windows up; workers wake the
feeder when a line ends (`BATCH_WAKE_CHANNEL`), so a freed slot is refilled at once.

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
        busy_share: float,
        cooldown_seconds: float,
    ) -> None:
        self._sessions = sessions
        self._registry = registry
        self._queue = queue
        self._share = bulk_share
        self._busy_share = busy_share
        self._cooldown = cooldown_seconds
        self._threads: dict[str, list[int]] = {}
        self._threads_at = 0.0
        # model -> monotonic time until which it counts as serving interactive traffic
        self._busy_until: dict[str, float] = {}

    async def workers(self) -> dict[str, list[int]]:
        """Each model's live workers, by their task threads (0: not announced)."""
        if time.monotonic() - self._threads_at > _WORKERS_CACHE_SECONDS:
            threads: dict[str, list[int]] = {}
            for beat in await self._registry.live_workers():
                threads.setdefault(beat.model, []).append(beat.concurrency)
            self._threads, self._threads_at = threads, time.monotonic()
        return self._threads

    def window(self, model: str, threads: list[int]) -> int:
        """How many of the model's batch lines may be out at once right now."""
        busy = self._busy_until.get(model, 0.0) > time.monotonic()
        share = self._busy_share if busy else self._share
        return sum(max(1, int(n * share)) if n else _DEFAULT_WINDOW for n in threads)

    async def feed_once(self) -> int:
        """Top every model's window up; returns how many lines were sent."""
        workers = await self.workers()
        if not workers:
            return 0
        async with self._sessions() as session:
            models = await batches_repo.unsent_models(session)
            if not models:
                return 0
            outstanding = await batches_repo.outstanding_by_model(session)
            busy = await batches_repo.models_with_interactive_work(session)
        until = time.monotonic() + self._cooldown
        for model in busy:
            self._busy_until[model] = until
        sent = 0
        for model in models:
            room = self.window(model, workers.get(model, [])) - outstanding.get(model, 0)
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
