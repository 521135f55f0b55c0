"""Re-sends the Celery message of jobs that may have lost it.

SQL is the source of truth: a job accepted with 2xx is in SQL before its message is sent.
If Redis loses the message (flushed, restarted without persistence), the job sits in
`queued` with no mark in the pending set; if its worker dies, it sits in `running` with an
expired lease. Both are sent again; the worker's conditional claim makes any duplicate
message a no-op. One API process at a time does the work (a short Redis lock). A pass
pages through every stranded job, so the marked ones of a long backlog never hide a lost one.

Once per `metrics_resync_seconds` (one process in all) it also corrects /metrics' open-job
counts from SQL: kept as jobs come and go, they drift when Redis loses them or a process
dies between a commit and its count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta

from redis.asyncio import Redis

from api.core.db import Database
from api.jobs.enqueue import JobQueue, QueuedJob
from storage import job_metrics
from storage.broker import priority_lists
from storage.keys import METRICS_RESYNC_LOCK, RECONCILER_LOCK, Lane, queue_name
from storage.locks import take_turn
from storage.models import utcnow
from storage.pending import PendingJobs
from storage.repositories import jobs as jobs_repo
from storage.repositories.jobs import StrandedJob

log = logging.getLogger(__name__)
_PAGE = 500
# The share of its interval a pass may spend reading pages.
_PASS_SHARE = 0.5


class Reconciler:
    def __init__(
        self,
        db: Database,
        redis: Redis,
        queue: JobQueue,
        *,
        interval_seconds: float,
        grace_seconds: float,
        metrics_resync_seconds: float = 300.0,
        settle_seconds: float = 1.0,
    ) -> None:
        self._db = db
        self._redis = redis
        self._pending = PendingJobs(redis)
        self._queue = queue
        self._interval = interval_seconds
        self._grace = grace_seconds
        self._resync_seconds = metrics_resync_seconds
        self._settle_seconds = settle_seconds
        self._task: asyncio.Task[None] | None = None
        self._resume_after: str | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconciler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await take_turn(self._redis, RECONCILER_LOCK, int(self._interval * 900)):
                    resent = await self.reconcile_once()
                    if resent:
                        log.warning("reconciler re-sent %d jobs", resent)
            except Exception:
                log.exception("reconciler pass failed")
            try:
                if await take_turn(
                    self._redis, METRICS_RESYNC_LOCK, int(self._resync_seconds * 1000)
                ):
                    await self.resync_open_counts()
            except Exception:
                log.exception("correcting the open-job counts failed")

    async def resync_open_counts(self) -> dict[str, int]:
        """Set /metrics' open-job counts to what SQL counts; the corrections made."""
        before = await job_metrics.read_jobs_open(self._redis)
        async with self._db.read() as session:
            counted = await jobs_repo.open_jobs_by_model(session)
        # A job committed before the count is counted in Redis a moment later: a count that
        # holds still this long had no job between its commit and its count.
        await asyncio.sleep(self._settle_seconds)
        after = await job_metrics.read_jobs_open(self._redis)
        corrected = await job_metrics.correct_jobs_open(self._redis, counted, before, after)
        if corrected:
            log.warning("open-job counts corrected from SQL: %s", corrected)
        return corrected

    async def reconcile_once(self) -> int:
        """One pass over the stranded jobs, a page at a time in id order, so a lost message
        is found behind any number of jobs whose messages are still queued. How many jobs
        it sent again."""
        cutoff = utcnow() - timedelta(seconds=self._grace)
        # A pass ends well within its turn; a backlog it could not finish is taken up
        # where it stopped by this process's next pass.
        stop_at = time.monotonic() + self._interval * _PASS_SHARE
        after, resent = self._resume_after, 0
        while True:
            async with self._db.read() as session:
                page = await jobs_repo.find_stranded_jobs(
                    session,
                    queued_before=cutoff,
                    lease_expired_before=cutoff,
                    limit=_PAGE,
                    after=after,
                )
            resent += await self._resend_lost(page, cutoff)
            after = page[-1].id if len(page) == _PAGE else None
            if after is None or time.monotonic() >= stop_at:
                break
        self._resume_after = after
        return resent

    async def _resend_lost(self, stranded: list[StrandedJob], cutoff: datetime) -> int:
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
