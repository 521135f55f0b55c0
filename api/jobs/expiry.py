"""The expiry sweep: queued jobs past their deadline end `expired` and never run.

One API process at a time (a short Redis turn, as the reconciler's) ends them in bounded
batches through the partial index on queued jobs' deadlines, then ends their event
streams and gives their reserved tokens back, as a cancel of a queued job does. The
worker's claim is the second guard (worker/group_commit.py): a job whose message reaches
a worker before a sweep does is expired there, never run. Both are conditional updates,
so a job ends once whichever gets to it first.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

from api.core.state import AppState
from storage.events import FIRST_UNCLAIMED, JobEvent, terminal_events
from storage.job_metrics import record_jobs_ended
from storage.keys import EXPIRY_LOCK
from storage.locks import take_turn
from storage.models import Job, JobStatus
from storage.ratelimit import unused_tokens
from storage.repositories import jobs as jobs_repo

log = logging.getLogger(__name__)


class ExpirySweep:
    def __init__(self, state: AppState) -> None:
        self._state = state
        self._interval = state.settings.deadline_sweep_seconds
        self._batch = state.settings.deadline_sweep_batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="expiry-sweep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                if await take_turn(self._state.redis, EXPIRY_LOCK, int(self._interval * 900)):
                    expired = await self.sweep_once()
                    if expired:
                        log.info("expired %d queued jobs past their deadline", expired)
            except Exception:
                log.exception("expiry sweep failed")

    async def sweep_once(self) -> int:
        """End every queued job past its deadline, a batch per transaction; how many."""
        total = 0
        while True:
            async with self._state.db.transaction() as session:
                jobs = await jobs_repo.expire_due(session, limit=self._batch)
            # Committed: a client that sees `expired` finds the row ended.
            await announce(self._state, jobs)
            total += len(jobs)
            if len(jobs) < self._batch:
                return total


async def announce(state: AppState, jobs: Sequence[Job]) -> None:
    """End expired jobs' event streams (no worker will) and give back what they reserved."""
    if not jobs:
        return
    # Tokens first: a client that sees `expired` may spend them at once.
    for job in jobs:
        unused = unused_tokens(job.reserved_tokens, 0, 0)
        if not unused:
            continue
        try:
            await state.limiter.give_back(job.owner_id, unused)
        except Exception:
            log.warning("could not give back %d tokens of job %s", unused, job.id, exc_info=True)
    try:
        await record_jobs_ended(
            state.redis, JobStatus.EXPIRED.value, Counter(job.model for job in jobs)
        )
    except Exception:
        log.warning("could not count %d expired jobs", len(jobs), exc_info=True)
    await state.events.publish(
        [
            (job.id, JobEvent(FIRST_UNCLAIMED, kind, data))
            for job in jobs
            for kind, data in terminal_events(JobStatus.EXPIRED, job)
        ]
    )
