"""Group commit for accepted jobs: many submits, one transaction.

A commit costs a WAL flush and a round trip or two; at a thousand submits a second that
is the API's whole budget. So each submit hands its rows here and waits: whatever rows
arrive while one transaction is committing go into the next one together. A caller's
`accept` returns only once its rows are committed (so a 202 always means "in SQL"), and
only then are the jobs handed to the queue for sending. With a dispatcher (the API's), an
interactive job is committed held instead and the dispatcher woken: it releases held jobs
fairly across keys (api/jobs/dispatch.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence

from redis.asyncio import Redis

from api.core.db import Database
from api.jobs.enqueue import JobQueue, QueuedJob
from storage.job_metrics import record_jobs_created
from storage.keys import Lane
from storage.models import Job
from storage.repositories import jobs as jobs_repo

log = logging.getLogger(__name__)
_MAX_BATCH = 500


class JobIntake:
    def __init__(
        self,
        db: Database,
        queue: JobQueue,
        on_held: Callable[[], None] | None = None,
        metrics: Redis | None = None,
    ) -> None:
        self._db = db
        self._queue = queue
        # Where new jobs are counted (storage/job_metrics.py); None: not counted.
        self._metrics = metrics
        # Wakes the dispatcher; None: interactive jobs are sent at once too.
        self._on_held = on_held
        self._waiting: list[tuple[Sequence[Job], asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-intake")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def accept(self, jobs: Sequence[Job]) -> None:
        """Commit these jobs (with whatever else is waiting), then queue them."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((jobs, done))
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                batch, self._waiting = self._waiting[:_MAX_BATCH], self._waiting[_MAX_BATCH:]
                await self._commit(batch)

    async def _commit(self, batch: list[tuple[Sequence[Job], asyncio.Future[None]]]) -> None:
        rows = [job for jobs, _ in batch for job in jobs]
        try:
            async with self._db.transaction() as session:
                await jobs_repo.insert_jobs(session, rows)
        except Exception as exc:
            if len(batch) > 1:
                # One bad row must not fail its neighbours: commit each on its own.
                for item in batch:
                    await self._commit([item])
                return
            log.exception("could not store %d jobs", len(rows))
            _settle(batch, exc)
            return
        _settle(batch, None)
        await self._count(rows)
        if self._on_held is not None and any(j.lane == Lane.INTERACTIVE for j in rows):
            self._on_held()
            rows = [j for j in rows if j.lane != Lane.INTERACTIVE]
        self._queue.enqueue([QueuedJob(j.id, j.model, j.lane, j.priority) for j in rows])

    async def _count(self, rows: list[Job]) -> None:
        if self._metrics is None:
            return
        try:
            await record_jobs_created(self._metrics, Counter(j.model for j in rows))
        except Exception:
            log.warning("could not count %d new jobs", len(rows), exc_info=True)


def _settle(batch: list[tuple[Sequence[Job], asyncio.Future[None]]], exc: Exception | None) -> None:
    for _, done in batch:
        if done.done():
            continue
        if exc is None:
            done.set_result(None)
        else:
            done.set_exception(exc)
