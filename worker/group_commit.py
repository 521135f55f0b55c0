"""Many small SQL writes to one transaction (group commit): job claims and job ends.

A worker's loop makes one claim per Celery message and records one end per job; each alone
is a transaction with its BEGIN, COMMIT and pool check-out (a pre-ping), and under load
those round trips were the largest part of the loop's busy time (py-spy, during
bench/batch_vs_runbatch.py). So each kind of write goes through one `GroupCommit` per
worker: a caller hands over its item and waits; the committer writes everything that
arrived while its previous transaction ran, in one transaction. There is no timer: a lone
item is written at once, and under load (64 jobs arriving, a batch's lines ending in the
same engine step) N items share one transaction, and one statement: claims are one
`UPDATE ... WHERE id IN (...)`, job ends one executemany UPDATE and one SELECT of the rows
it changed (`jobs_repo.finish_jobs`).

If a grouped transaction fails, each item is written again in a transaction of its own
(when the writer allows it), so one bad row fails only its own caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage.models import Job, JobStatus
from storage.repositories import jobs as jobs_repo

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Writes a group in one session (transaction): one result per item, in order.
GroupWrite = Callable[[AsyncSession, Sequence[T]], Awaitable[list[R]]]


@dataclasses.dataclass(slots=True)
class _Pending(Generic[T, R]):
    item: T
    done: asyncio.Future[R]


class GroupCommit(Generic[T, R]):
    """One per kind of write per worker process, on the runner's loop (module docstring)."""

    def __init__(
        self,
        name: str,
        sessions: async_sessionmaker[AsyncSession],
        write: GroupWrite[T, R],
        *,
        retry_alone: bool = True,
    ) -> None:
        self._name = name
        self._sessions = sessions
        self._write_group = write
        self._retry_alone = retry_alone
        self._pending: list[_Pending[T, R]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._name)

    async def submit(self, item: T) -> R:
        """Write `item` in the next group; raises what writing it raised."""
        if self._task is None or self._task.done():
            raise RuntimeError(f"{self._name} is not running")
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, done))
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

    async def _write(self, group: list[_Pending[T, R]]) -> None:
        try:
            async with self._sessions.begin() as session:
                results = await self._write_group(session, [p.item for p in group])
        except Exception as exc:
            if len(group) == 1 or not self._retry_alone:
                for pending in group:
                    if not pending.done.done():
                        pending.done.set_exception(exc)
                return
            log.warning(
                "%s: writing %d items together failed; one by one instead",
                self._name,
                len(group),
                exc_info=True,
            )
            for pending in group:
                await self._write(group=[pending])
            return
        for pending, result in zip(group, results, strict=True):
            if not pending.done.done():
                pending.done.set_result(result)


# -- the two writes a worker groups -------------------------------------------------------


def claim_committer(
    sessions: async_sessionmaker[AsyncSession], worker_id: str, lease_seconds: float
) -> GroupCommit[str, Job | None]:
    """Claims by job id, one UPDATE per group (`jobs_repo.claim_jobs`): the job, or None
    when it is not ours to run (a job asked for twice in a group is claimed once). A job
    still queued past its deadline is not claimed but ended in the same transaction: it
    comes back with status `expired`, for the caller to announce (it never runs)."""

    async def write(session: AsyncSession, job_ids: Sequence[str]) -> list[Job | None]:
        distinct = list(dict.fromkeys(job_ids))
        claimed = await jobs_repo.claim_jobs(session, distinct, worker_id, lease_seconds)
        # Only what the claim refused can be past its deadline: a group claimed whole (the
        # usual case) costs no second statement.
        refused = [job_id for job_id in distinct if job_id not in claimed]
        if refused:
            expired = await jobs_repo.expire_due(session, limit=len(refused), job_ids=refused)
            claimed.update((job.id, job) for job in expired)
        return [claimed.pop(job_id, None) for job_id in job_ids]

    # A failed claim is not retried alone: the job stays queued and its message (or the
    # reconciler) brings it back.
    return GroupCommit("claims", sessions, write, retry_alone=False)


async def record_outcomes(
    session: AsyncSession, worker_id: str, outcomes: Sequence[tuple[str, jobs_repo.JobOutcome]]
) -> list[JobStatus | None]:
    """Record attempts' ends (one statement for all); for each, the status the job ended
    with, or None when the job is no longer this worker's (its lease lapsed and another
    worker took it over)."""
    landed = await jobs_repo.finish_jobs(session, worker_id, outcomes)
    return [
        outcome.status if ok else await _not_landed(session, job_id, worker_id, outcome)
        for (job_id, outcome), ok in zip(outcomes, landed, strict=True)
    ]


async def _not_landed(
    session: AsyncSession, job_id: str, worker_id: str, outcome: jobs_repo.JobOutcome
) -> JobStatus | None:
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


def outcome_committer(
    sessions: async_sessionmaker[AsyncSession], worker_id: str
) -> GroupCommit[tuple[str, jobs_repo.JobOutcome], JobStatus | None]:
    """Job ends as (job id, outcome), `record_outcomes` of a group in one transaction."""

    async def write(
        session: AsyncSession, outcomes: Sequence[tuple[str, jobs_repo.JobOutcome]]
    ) -> list[JobStatus | None]:
        return await record_outcomes(session, worker_id, outcomes)

    return GroupCommit("outcomes", sessions, write)
