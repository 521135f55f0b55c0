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
from typing import Any

from celery import Celery
from redis.asyncio import Redis

from storage.broker import celery_conf, celery_priority
from storage.keys import (
    PENDING_JOBS,
    RUN_BULK_JOBS_TASK,
    RUN_JOB_TASK,
    RUN_JOBS_TASK,
    Lane,
    queue_name,
)

log = logging.getLogger(__name__)
# Batch lines go this many to a Celery message (see storage.keys.RUN_BULK_JOBS_TASK).
BULK_LINES_PER_MESSAGE = 8
# Interactive jobs sent together share messages (storage.keys.RUN_JOBS_TASK), but a burst
# is always spread over at least this many messages, so that as many workers can share
# it; a job that arrives alone is a message of its own.
INTERACTIVE_MIN_MESSAGES = 8
INTERACTIVE_JOBS_PER_MESSAGE = 8


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
            for task, args, first in _messages(jobs):
                self._celery.send_task(
                    task, args=args, queue=queue_name(first.model, first.lane),
                    priority=celery_priority(first.priority), producer=producer,
                )


def _messages(jobs: Sequence[QueuedJob]) -> list[tuple[str, list[Any], QueuedJob]]:
    """(task, args, a job giving queue and priority) per message. Jobs of one message share
    model, lane and priority. Batch lines go up to BULK_LINES_PER_MESSAGE a message.
    Interactive jobs of one model and priority go one per message up to
    INTERACTIVE_MIN_MESSAGES of them; more are spread evenly over that many messages (or
    more, so that none carries over INTERACTIVE_JOBS_PER_MESSAGE)."""
    messages: list[tuple[str, list[Any], QueuedJob]] = []
    groups: dict[tuple[str, str, int], list[QueuedJob]] = {}
    for job in jobs:
        groups.setdefault((job.lane, job.model, job.priority), []).append(job)
    for (lane, _, _), group in groups.items():
        if lane == "bulk":
            for i in range(0, len(group), BULK_LINES_PER_MESSAGE):
                chunk = group[i:i + BULK_LINES_PER_MESSAGE]
                messages.append((RUN_BULK_JOBS_TASK, [[j.id for j in chunk]], chunk[0]))
            continue
        count = max(min(len(group), INTERACTIVE_MIN_MESSAGES),
                    -(-len(group) // INTERACTIVE_JOBS_PER_MESSAGE))
        for chunk in _split_evenly(group, count):
            if len(chunk) == 1:
                messages.append((RUN_JOB_TASK, [chunk[0].id], chunk[0]))
            else:
                messages.append((RUN_JOBS_TASK, [[j.id for j in chunk]], chunk[0]))
    return messages


def _split_evenly(items: list[QueuedJob], count: int) -> list[list[QueuedJob]]:
    """`count` consecutive runs of `items` whose lengths differ by at most one."""
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for k in range(count):
        end = start + size + (1 if k < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs
