"""Sends jobs' Celery messages, after their rows are committed.

Celery's producer is blocking, so sends run on a worker thread, batched: whatever jobs
arrive while one batch is being sent go out together on one producer connection. A job
whose send fails stays `queued` in SQL and the reconciler sends it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery
from redis.asyncio import Redis

from storage.broker import celery_conf, celery_priority
from storage.keys import PENDING_JOBS, RUN_BULK_JOB_TASK, RUN_JOB_TASK, Lane, queue_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: str
    model: str
    lane: Lane
    priority: int


def create_producer(redis_url: str) -> Celery:
    app = Celery("ferry-api", broker=redis_url)
    app.conf.update(celery_conf())
    return app


class JobQueue:
    def __init__(self, celery: Celery, redis: Redis) -> None:
        self._celery = celery
        self._redis = redis
        self._pending: list[QueuedJob] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="job-queue")

    async def stop(self) -> None:
        if self._pending:
            await self._send(self._pending)
            self._pending = []
        if self._task is not None:
            self._task.cancel()

    def enqueue(self, jobs: Sequence[QueuedJob]) -> None:
        """Hand committed jobs over for sending; returns at once."""
        self._pending.extend(jobs)
        self._wake.set()

    async def send_now(self, jobs: Sequence[QueuedJob]) -> None:
        """Send and wait (the reconciler's path)."""
        await self._send(jobs)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            try:
                await self._send(batch)
            except Exception:
                # The rows are in SQL: the reconciler re-sends what did not go out.
                log.exception("sending %d jobs failed; the reconciler will retry", len(batch))

    async def _send(self, jobs: Sequence[QueuedJob]) -> None:
        if not jobs:
            return
        now = time.time()
        # Mark first: a worker that claims the job removes the mark, so the mark must not
        # land after the claim.
        await self._redis.zadd(PENDING_JOBS, {job.id: now for job in jobs})
        await asyncio.to_thread(self._publish, jobs)

    def _publish(self, jobs: Sequence[QueuedJob]) -> None:
        with self._celery.producer_or_acquire() as producer:
            for job in jobs:
                self._celery.send_task(
                    # Bulk jobs' task also tells the batch feeder a slot came free.
                    RUN_BULK_JOB_TASK if job.lane == "bulk" else RUN_JOB_TASK,
                    args=[job.id],
                    queue=queue_name(job.model, job.lane),
                    priority=celery_priority(job.priority),
                    producer=producer,
                )
