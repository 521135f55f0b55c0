"""The batch side of jobs: a batch's lines are jobs of lane `bulk`. Feeding them to the
bulk queue a window at a time, cancelling those still open, counting them by status."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.keys import Lane
from storage.models import BATCH_OUTSTANDING, BATCH_UNSENT, INTERACTIVE_OPEN, Job, JobStatus, utcnow


@dataclass(frozen=True, slots=True)
class CancelledLines:
    running: list[str]  # for their workers to abort
    by_model: Counter[str]  # every line cancelled here, for the job metrics


async def cancel_open_jobs(session: AsyncSession, batch_id: str) -> CancelledLines:
    """Cancel the batch's queued jobs (they will never run) and running ones."""
    now = utcnow()
    queued = await session.execute(
        update(Job)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=now)
        .returning(Job.model)
        .execution_options(synchronize_session=False)
    )
    by_model = Counter(queued.scalars().all())
    running = (
        await session.execute(
            update(Job)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.RUNNING)
            .values(status=JobStatus.CANCELLED, finished_at=now)
            .returning(Job.id, Job.model)
            .execution_options(synchronize_session=False)
        )
    ).all()
    by_model.update(row.model for row in running)
    return CancelledLines([row.id for row in running], by_model)


# -- progress ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """A batch's jobs by status, and the tokens they used (from SQL, never a cache)."""

    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    open: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def progress(session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, BatchProgress]:
    if not batch_ids:
        return {}
    query = (
        select(
            Job.batch_id,
            Job.status,
            func.count(),
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
        )
        .where(Job.batch_id.in_(batch_ids))
        .group_by(Job.batch_id, Job.status)
    )
    counts: dict[str, dict[str, int]] = {}
    for batch_id, status, count, prompt, completion in (await session.execute(query)).all():
        c = counts.setdefault(str(batch_id), {"prompt": 0, "completion": 0})
        c[status] = c.get(status, 0) + int(count)
        c["prompt"] += int(prompt or 0)
        c["completion"] += int(completion or 0)
    return {
        batch_id: BatchProgress(
            succeeded=c.get(JobStatus.SUCCEEDED, 0),
            # A line past its own deadline (`deadline_seconds`) never ran: it failed.
            failed=c.get(JobStatus.FAILED, 0) + c.get(JobStatus.EXPIRED, 0),
            cancelled=c.get(JobStatus.CANCELLED, 0),
            open=c.get(JobStatus.QUEUED, 0) + c.get(JobStatus.RUNNING, 0),
            prompt_tokens=c["prompt"],
            completion_tokens=c["completion"],
        )
        for batch_id, c in counts.items()
    }


# -- feeding the bulk queue --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UnsentJob:
    id: str
    model: str
    lane: Lane
    priority: int


async def outstanding_by_model(session: AsyncSession) -> dict[str, int]:
    """Batch jobs sent to the bulk queue and not finished, per model."""
    query = select(Job.model, func.count()).where(text(BATCH_OUTSTANDING)).group_by(Job.model)
    return {model: int(n) for model, n in (await session.execute(query)).all()}


async def models_with_interactive_work(session: AsyncSession) -> set[str]:
    """Models with interactive jobs queued or running right now."""
    query = select(Job.model).where(text(INTERACTIVE_OPEN)).distinct()
    return set((await session.scalars(query)).all())


async def unsent_models(session: AsyncSession) -> list[str]:
    query = select(Job.model).where(text(BATCH_UNSENT)).distinct()
    return list((await session.scalars(query)).all())


async def next_unsent(session: AsyncSession, model: str, limit: int) -> list[UnsentJob]:
    """The oldest batch jobs of a model not yet sent (older batches first, in line order)."""
    query = (
        select(Job.id, Job.model, Job.lane, Job.priority)
        .where(text(BATCH_UNSENT), Job.model == model)
        .order_by(Job.id)
        .limit(limit)
    )
    rows = (await session.execute(query)).all()
    return [UnsentJob(r.id, r.model, r.lane, r.priority) for r in rows]


async def mark_sent(session: AsyncSession, job_ids: Sequence[str], at: datetime) -> None:
    """Only still-queued, still-unsent jobs: a job cancelled meanwhile stays as it is."""
    if job_ids:
        await session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED, Job.enqueued_at.is_(None))
            .values(enqueued_at=at)
            .execution_options(synchronize_session=False)
        )
