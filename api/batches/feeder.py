"""The batch feeder: sends batch lines to their model's bulk queue a window at a time.

Sending all 50,000 lines of a batch to Celery at once would let workers' task threads
fill up with bulk work, and an interactive job arriving then would wait for a thread to
come free. So the lines stay in SQL (jobs `queued`, `enqueued_at` NULL) and the feeder
keeps, per model, only as many out as the live workers say they take: each announces its
`bulk_window` (the engine slots batch lines may fill, plus a backlog of lines claimed and
waiting at its admission gate so a slot that frees is refilled at once; see
worker/admission.py). While a model has interactive jobs in flight (and for
`batch_interactive_cooldown_seconds` after) the window is the smaller `bulk_window_busy`,
so the workers' remaining threads stay free for interactive jobs. Each pass tops the
windows up; workers wake the feeder when a line ends (`BATCH_WAKE_CHANNEL`).

A line is marked sent (`enqueued_at`) before its message goes out: if the process dies in
between, the reconciler finds it `queued` with no pending mark and sends it again, and
the worker's conditional claim makes a duplicate message harmless.
"""

from __future__ import annotations

import time

from api.core.db import Database
from api.jobs.enqueue import JobQueue, QueuedJob
from storage.keys import Lane
from storage.models import utcnow
from storage.registry import ModelRegistry, WorkerBeat
from storage.repositories import batch_jobs as batch_jobs_repo

# A worker that does not announce its window gets this many batch lines at once.
_DEFAULT_WINDOW = 8
_WORKERS_CACHE_SECONDS = 1.0


class BatchFeeder:
    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        queue: JobQueue,
        *,
        cooldown_seconds: float,
    ) -> None:
        self._db = db
        self._registry = registry
        self._queue = queue
        self._cooldown = cooldown_seconds
        self._workers: dict[str, list[WorkerBeat]] = {}
        self._workers_at = 0.0
        # model -> monotonic time until which it counts as serving interactive traffic
        self._busy_until: dict[str, float] = {}

    async def workers(self) -> dict[str, list[WorkerBeat]]:
        """Each model's live workers."""
        if time.monotonic() - self._workers_at > _WORKERS_CACHE_SECONDS:
            workers: dict[str, list[WorkerBeat]] = {}
            for beat in await self._registry.live_workers():
                workers.setdefault(beat.model, []).append(beat)
            self._workers, self._workers_at = workers, time.monotonic()
        return self._workers

    def window(self, model: str, workers: list[WorkerBeat]) -> int:
        """How many of the model's batch lines may be out at once right now."""
        busy = self._busy_until.get(model, 0.0) > time.monotonic()
        return sum(
            (w.bulk_window_busy if busy else w.bulk_window) or _DEFAULT_WINDOW for w in workers
        )

    async def feed_once(self) -> int:
        """Top every model's window up; returns how many lines were sent."""
        workers = await self.workers()
        if not workers:
            return 0
        async with self._db.read() as session:
            models = await batch_jobs_repo.unsent_models(session)
            if not models:
                return 0
            outstanding = await batch_jobs_repo.outstanding_by_model(session)
            busy = await batch_jobs_repo.models_with_interactive_work(session)
        # A LoRA adapter's lines run on its base model's workers: they share its window.
        base = {
            adapter: model
            for model, beats in workers.items()
            for beat in beats
            for adapter in beat.adapters
        }
        until = time.monotonic() + self._cooldown
        for model in busy:
            self._busy_until[base.get(model, model)] = until
        rooms: dict[str, int] = {}
        for model, count in outstanding.items():
            engine = base.get(model, model)
            rooms[engine] = rooms.get(engine, 0) - count
        sent = 0
        for model in models:
            engine = base.get(model, model)
            room = self.window(engine, workers.get(engine, [])) + rooms.get(engine, 0)
            if room > 0:
                count = await self._send(model, room)
                rooms[engine] = rooms.get(engine, 0) - count
                sent += count
        return sent

    async def _send(self, model: str, room: int) -> int:
        async with self._db.transaction() as session:
            jobs = await batch_jobs_repo.next_unsent(session, model, room)
            await batch_jobs_repo.mark_sent(session, [j.id for j in jobs], utcnow())
        if jobs:
            await self._queue.send_now(
                [QueuedJob(j.id, j.model, Lane.BULK, j.priority) for j in jobs]
            )
        return len(jobs)
