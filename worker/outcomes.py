"""Recording attempts' ends in SQL, many to a transaction (group commit).

Every attempt that ends hands its outcome to the one `OutcomeWriter` of its worker and
waits. The writer commits everything that arrived while its previous transaction ran in
one transaction: no timer, so a lone job's end is written at once, and under load (a batch's
lines, 64 interactive jobs ending in the same engine step) N ends share one BEGIN, COMMIT and
pool check-out instead of paying N. Profiling a 2,000-line batch showed those per-transaction
round trips as the largest part of the worker loop's busy time.

If a grouped transaction fails, each outcome in it is written again in a transaction of its
own, so one bad row fails only its own job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import JobStatus
from storage.repositories import jobs as jobs_repo

log = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class _Pending:
    job_id: str
    worker_id: str
    outcome: jobs_repo.JobOutcome
    done: asyncio.Future[JobStatus | None]


async def record_outcome(
    session: AsyncSession, job_id: str, worker_id: str, outcome: jobs_repo.JobOutcome
) -> JobStatus | None:
    """Record one attempt's end; the status the job ended with, or None when the job is
    no longer this worker's (its lease lapsed and another worker took it over)."""
    if await jobs_repo.finish_job(session, job_id, worker_id, outcome):
        return outcome.status
    if outcome.status == JobStatus.CANCELLED:
        return None
    # Lost the job while generating: cancelled under us (then its partial output is still
    # recorded), or our lease lapsed and another worker owns it from here on.
    if not await jobs_repo.is_cancelled(session, job_id):
        return None
    cancelled = dataclasses.replace(outcome, status=JobStatus.CANCELLED)
    if await jobs_repo.finish_job(session, job_id, worker_id, cancelled):
        return JobStatus.CANCELLED
    return None


class OutcomeWriter:
    """One per worker process, on the runner's loop (module docstring)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outcome-writer")

    async def record(
        self, job_id: str, worker_id: str, outcome: jobs_repo.JobOutcome
    ) -> JobStatus | None:
        """`record_outcome`, in the next group; raises what writing it alone raised."""
        if self._task is None or self._task.done():
            raise RuntimeError("the outcome writer is not running")
        done: asyncio.Future[JobStatus | None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(job_id, worker_id, outcome, done))
        self._wake.set()
        return await done

    async def stop(self) -> None:
        """Write what is waiting, then end."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            group, self._pending = self._pending, []
            group = [p for p in group if not p.done.done()]  # its waiter went away
            if group:
                await self._write(group)
            if self._closing and not self._pending:
                return

    async def _write(self, group: list[_Pending]) -> None:
        try:
            async with self._sessions.begin() as session:
                statuses = [await record_outcome(session, p.job_id, p.worker_id, p.outcome)
                            for p in group]
        except Exception as exc:
            if len(group) == 1:
                if not group[0].done.done():
                    group[0].done.set_exception(exc)
                return
            log.warning("recording %d job ends together failed; one by one instead",
                        len(group), exc_info=True)
            for pending in group:
                await self._write_alone(pending)
            return
        for pending, status in zip(group, statuses, strict=True):
            if not pending.done.done():
                pending.done.set_result(status)

    async def _write_alone(self, pending: _Pending) -> None:
        try:
            async with self._sessions.begin() as session:
                status = await record_outcome(session, pending.job_id, pending.worker_id,
                                              pending.outcome)
        except Exception as exc:
            if not pending.done.done():
                pending.done.set_exception(exc)
            return
        if not pending.done.done():
            pending.done.set_result(status)
