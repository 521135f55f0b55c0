"""Every query on batch rows: ids, lookups, and each step of a batch's life.

Each state change is a conditional UPDATE on the batch's current status, so API processes
racing on one batch (an expansion taken over after a crash, a cancel against the window
expiring) can never both win. The batch's lines are jobs (`batch_jobs.py`); what they
came to, for its output files, is `batch_results.py`.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Batch, BatchStatus, Job, JobStatus, utcnow
from storage.repositories import webhooks

# Batches whose jobs may still be running: they end once none of their jobs is open.
SETTLING = (BatchStatus.IN_PROGRESS, BatchStatus.CANCELLING, BatchStatus.FINALIZING)
OPEN_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)
# Every status a batch can leave (the supervisor has work while one exists).
OPEN_BATCH = (BatchStatus.VALIDATING, *SETTLING)


def new_batch_id() -> str:
    return f"batch_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


def batch_job_id_prefix() -> str:
    """A prefix for one expansion's job ids: `prefix + f"{line:06x}"` orders a batch's jobs
    by input line (its output file keeps the input's order) and after older jobs."""
    return f"job_{int(time.time() * 1000):012x}{secrets.token_hex(3)}"


async def add_batch(session: AsyncSession, batch: Batch) -> None:
    session.add(batch)
    await session.flush()


async def get_batch(session: AsyncSession, batch_id: str) -> Batch | None:
    return await session.get(Batch, batch_id, populate_existing=True)


async def get_owned_batch(session: AsyncSession, batch_id: str, owner_id: str) -> Batch | None:
    batch = await get_batch(session, batch_id)
    if batch is None or batch.owner_id != owner_id:
        return None
    return batch


async def list_owned_batches(
    session: AsyncSession, owner_id: str, *, after: str | None, limit: int
) -> list[Batch]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Batch).where(Batch.owner_id == owner_id)
    if after is not None:
        query = query.where(Batch.id < after)
    return list((await session.scalars(query.order_by(Batch.id.desc()).limit(limit))).all())


# -- expansion (validating -> in_progress | failed) -------------------------------------


async def claim_expansion(session: AsyncSession, batch_id: str, lease_seconds: float) -> bool:
    """Take a validating batch whose expansion nobody holds (or whose holder died)."""
    now = utcnow()
    result = await session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.status == BatchStatus.VALIDATING,
            or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def claim_settling(session: AsyncSession, batch_id: str, lease_seconds: float) -> bool:
    """Take the finalisation of a batch whose lines have all stopped."""
    now = utcnow()
    result = await session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.status.in_(SETTLING),
            or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now),
        )
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def extend_expansion(session: AsyncSession, batch_id: str, lease_seconds: float) -> None:
    """The expansion is still going: keep holding the batch."""
    await session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == BatchStatus.VALIDATING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )


async def any_open(session: AsyncSession) -> bool:
    """Is any batch not yet in a final state? (One index probe: ix_batches_status.)"""
    query = select(exists().where(Batch.status.in_(OPEN_BATCH)))
    return bool(await session.scalar(query))


async def unclaimed_validating(session: AsyncSession, limit: int) -> list[str]:
    now = utcnow()
    query = (
        select(Batch.id)
        .where(
            Batch.status == BatchStatus.VALIDATING,
            or_(Batch.lease_expires_at.is_(None), Batch.lease_expires_at < now),
            Batch.expires_at > now,
        )
        .order_by(Batch.id)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())


async def start_batch(
    session: AsyncSession, batch_id: str, *, total: int, invalid: int, model: str | None
) -> bool:
    """validating -> in_progress, in the transaction that stored its jobs; False (and the
    caller rolls back) when the batch was cancelled or taken over meanwhile."""
    return await _move(
        session,
        batch_id,
        [BatchStatus.VALIDATING],
        status=BatchStatus.IN_PROGRESS,
        in_progress_at=utcnow(),
        request_total=total,
        invalid_count=invalid,
        model=model,
        lease_expires_at=None,
    )


async def fail_batch(
    session: AsyncSession,
    batch_id: str,
    errors: list[dict[str, Any]],
    *,
    total: int = 0,
    invalid: int = 0,
) -> bool:
    moved = await _move(
        session,
        batch_id,
        [BatchStatus.VALIDATING],
        status=BatchStatus.FAILED,
        failed_at=utcnow(),
        errors=errors,
        request_total=total,
        invalid_count=invalid,
        lease_expires_at=None,
    )
    if moved:
        await _announce_end(session, batch_id, BatchStatus.FAILED)
    return moved


# -- cancel and expiry -------------------------------------------------------------------


async def request_cancel(session: AsyncSession, batch_id: str) -> bool:
    """validating / in_progress -> cancelling. False if the batch is past that."""
    return await _move(
        session,
        batch_id,
        [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS],
        status=BatchStatus.CANCELLING,
        outcome=BatchStatus.CANCELLED,
        cancelling_at=utcnow(),
    )


async def past_window(session: AsyncSession, limit: int) -> list[tuple[str, str | None]]:
    """(id, model) of batches whose completion window has passed."""
    query = (
        select(Batch.id, Batch.model)
        .where(
            Batch.status.in_([BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]),
            Batch.expires_at < utcnow(),
        )
        .order_by(Batch.id)
        .limit(limit)
    )
    return [(r.id, r.model) for r in (await session.execute(query)).all()]


async def begin_expiry(session: AsyncSession, batch_id: str) -> bool:
    """The completion window passed: finalizing, to end as expired."""
    return await _move(
        session,
        batch_id,
        [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS],
        status=BatchStatus.FINALIZING,
        outcome=BatchStatus.EXPIRED,
        finalizing_at=utcnow(),
        lease_expires_at=None,
    )


# -- finalisation ------------------------------------------------------------------------


async def ready_to_finalize(session: AsyncSession, limit: int) -> list[tuple[str, str | None]]:
    """(id, model) of batches none of whose jobs is still queued or running."""
    open_jobs = exists().where(Job.batch_id == Batch.id, Job.status.in_(OPEN_JOB))
    query = (
        select(Batch.id, Batch.model)
        .where(Batch.status.in_(SETTLING), ~open_jobs)
        .order_by(Batch.id)
        .limit(limit)
    )
    return [(r.id, r.model) for r in (await session.execute(query)).all()]


async def begin_finalizing(
    session: AsyncSession, batch_id: str, output_file_id: str, error_file_id: str
) -> Batch | None:
    """Fix the ids the batch's files will have (kept if already chosen, so a repeated
    finalisation overwrites the same objects) and move in_progress -> finalizing."""
    batch = await get_batch(session, batch_id)
    if batch is None or batch.status not in SETTLING:
        return None
    batch.output_file_id = batch.output_file_id or output_file_id
    batch.error_file_id = batch.error_file_id or error_file_id
    if batch.status == BatchStatus.IN_PROGRESS:
        batch.status = BatchStatus.FINALIZING
        batch.finalizing_at = utcnow()
    await session.flush()
    return batch


async def end_batch(
    session: AsyncSession,
    batch_id: str,
    status: BatchStatus,
    *,
    output_file_id: str | None,
    error_file_id: str | None,
) -> bool:
    """finalizing / cancelling -> completed | cancelled | expired, with the files written."""
    stamp = {
        BatchStatus.COMPLETED: "completed_at",
        BatchStatus.CANCELLED: "cancelled_at",
        BatchStatus.EXPIRED: "expired_at",
    }[status]
    moved = await _move(
        session,
        batch_id,
        list(SETTLING),
        status=status,
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        **{stamp: utcnow()},
    )
    if moved:
        await _announce_end(session, batch_id, status)
    return moved


async def _announce_end(session: AsyncSession, batch_id: str, status: BatchStatus) -> None:
    """The batch's webhook for its end, in the transaction that ended it."""
    row = (
        await session.execute(
            select(Batch.owner_id, Batch.webhook_url, Batch.webhook_events).where(
                Batch.id == batch_id
            )
        )
    ).one()
    event = status.value
    if row.webhook_url is not None and webhooks.wanted(row.webhook_url, row.webhook_events, event):
        await webhooks.record(
            session,
            [webhooks.Announcement(row.owner_id, row.webhook_url, "batch", batch_id, event)],
        )


async def _move(
    session: AsyncSession, batch_id: str, from_statuses: Sequence[str], **values: Any
) -> bool:
    result = await session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status.in_(list(from_statuses)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
