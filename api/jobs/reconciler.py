"""Re-sends the Celery message of jobs that may have lost it.

SQL is the source of truth: a job accepted with 2xx is in SQL before its message is sent.
If Redis loses the message (flushed, restarted without persistence), the job sits in
`queued` with no mark in the pending set; if its worker dies, it sits in `running` with an
expired lease. Both are sent again; the worker's conditional claim makes any duplicate
message a no-op. One API process at a time does the work (a short Redis lock).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from redis.asyncio import Redis

from api.core.db import Database
from api.jobs.enqueue import JobQueue, QueuedJob
from storage.broker import priority_lists
from storage.keys import Lane, queue_name
from storage.locks import take_reconciler_turn
from storage.models import utcnow
from storage.pending import PendingJobs
from storage.repositories import jobs as jobs_repo

log = logging.getLogger(__name__)
_BATCH = 500


class Reconciler:
    def __init__(
        self,
        db: Database,
        redis: Redis,
        queue: JobQueue,
        *,
        interval_seconds: float,
        grace_seconds: float,
    ) -> None:
        self._db = db
        self._redis = redis
        self._pending = PendingJobs(redis)
        self._queue = queue
        self._interval = interval_seconds
        self._grace = grace_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await take_reconciler_turn(self._redis, int(self._interval * 900)):
                    resent = await self.reconcile_once()
                    if resent:
                        log.warning("reconciler re-sent %d jobs", resent)
            except Exception:
                log.exception("reconciler pass failed")

    async def reconcile_once(self) -> int:
        cutoff = utcnow() - timedelta(seconds=self._grace)
        async with self._db.read() as session:
            stranded = await jobs_repo.find_stranded_jobs(
                session, queued_before=cutoff, lease_expired_before=cutoff, limit=_BATCH
            )
        if not stranded:
            return 0
        marks = await self._pending.marked_at([job.id for job in stranded])
        # A mark means a message is still on its way (e.g. a long interactive backlog)...
        # unless its queue is empty: then the message went to a worker that died before
        # claiming the job (Redis would hand it back only after the visibility timeout).
        old_marks = {
            (j.model, j.lane)
            for j, mark in zip(stranded, marks, strict=True)
            if mark is not None and mark < cutoff.timestamp()
        }
        drained = await self._empty_queues(old_marks)
        lost = [
            job
            for job, mark in zip(stranded, marks, strict=True)
            if mark is None or (mark < cutoff.timestamp() and (job.model, job.lane) in drained)
        ]
        if not lost:
            return 0
        await self._queue.send_now([QueuedJob(j.id, j.model, j.lane, j.priority) for j in lost])
        async with self._db.transaction() as session:
            await jobs_repo.mark_enqueued(session, [j.id for j in lost], utcnow())
        return len(lost)

    async def _empty_queues(self, queues: set[tuple[str, Lane]]) -> set[tuple[str, Lane]]:
        """Which of these (model, lane) Celery queues hold no message at all."""
        if not queues:
            return set()
        ordered = sorted(queues)
        pipe = self._redis.pipeline(transaction=False)
        for model, lane in ordered:
            for name in priority_lists(queue_name(model, lane)):
                pipe.llen(name)
        lengths = await pipe.execute()
        steps = len(lengths) // len(ordered)
        return {q for i, q in enumerate(ordered) if not any(lengths[i * steps : (i + 1) * steps])}
