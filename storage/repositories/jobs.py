"""Every query on jobs. Routes and tasks call these; they never build SQL themselves.

State changes are conditional updates, so two workers (or a worker and a cancelling API
process) racing on one job can never both win.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    inspect,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from storage.events import EXPIRED
from storage.keys import Lane
from storage.models import (
    INTERACTIVE_HELD,
    INTERACTIVE_QUEUED,
    QUEUED_WITH_DEADLINE,
    TERMINAL_STATUSES,
    Job,
    JobStatus,
    utcnow,
)
from storage.repositories import conversations, webhooks


def new_job_id() -> str:
    """Time-ordered id: 12 hex digits of milliseconds, then 12 random ones."""
    return f"job_{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


_JOB_ATTRIBUTES = [attr.key for attr in inspect(Job).column_attrs]


async def insert_jobs(session: AsyncSession, jobs: Sequence[Job]) -> None:
    """One multi-row INSERT (Core, not the unit of work: this is the submit hot path)."""
    if not jobs:
        return
    now = utcnow()
    rows = []
    for job in jobs:
        if job.created_at is None:
            job.created_at = now
        rows.append({attr: getattr(job, attr) for attr in _JOB_ATTRIBUTES})
    await session.execute(insert(Job), rows)


async def get_job(session: AsyncSession, job_id: str) -> Job | None:
    return await session.get(Job, job_id)


async def get_owned_job(session: AsyncSession, job_id: str, owner_id: str) -> Job | None:
    """A job only exists for the key that owns it."""
    job = await session.get(Job, job_id)
    if job is None or job.owner_id != owner_id:
        return None
    return job


async def list_owned_jobs(
    session: AsyncSession,
    owner_id: str,
    *,
    status: JobStatus | None,
    after: str | None,
    limit: int,
    lane: str | None = None,
    batch_id: str | None = None,
) -> list[Job]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Job).where(Job.owner_id == owner_id)
    if status is not None:
        query = query.where(Job.status == status)
    if lane is not None:
        query = query.where(Job.lane == lane)
    if batch_id is not None:
        query = query.where(Job.batch_id == batch_id)
    if after is not None:
        query = query.where(Job.id < after)
    query = query.order_by(Job.id.desc()).limit(limit)
    return list((await session.scalars(query)).all())


async def mark_enqueued(session: AsyncSession, job_ids: Sequence[str], at: datetime) -> None:
    if job_ids:
        await session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=at))


async def claim_job(
    session: AsyncSession, job_id: str, worker_id: str, lease_seconds: float
) -> Job | None:
    """Take a queued job, or one whose worker's lease ran out; None if not ours to run.

    Finished and cancelled jobs, and jobs under another worker's live lease, are left alone:
    that is what makes a duplicate Celery delivery harmless.
    """
    return (await claim_jobs(session, [job_id], worker_id, lease_seconds)).get(job_id)


async def claim_jobs(
    session: AsyncSession, job_ids: Sequence[str], worker_id: str, lease_seconds: float
) -> dict[str, Job]:
    """`claim_job` for several jobs in one statement (a Celery message of batch lines):
    the claimed ones by id; the others are not ours to run."""
    if not job_ids:
        return {}
    now = utcnow()
    claimable = or_(
        # A queued job past its deadline is never run (`expire_due` ends it instead).
        and_(
            Job.status == JobStatus.QUEUED,
            or_(Job.deadline_at.is_(None), Job.deadline_at > now),
        ),
        and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now),
    )
    # One statement: the updated rows come back with RETURNING. The session holds none of
    # them yet, so it need not evaluate the WHERE clause against its own objects.
    claimed = await session.scalars(
        update(Job)
        .where(Job.id.in_(job_ids), claimable)
        .values(
            status=JobStatus.RUNNING,
            worker_id=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            attempts=Job.attempts + 1,
            started_at=now,
        )
        .returning(Job),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    jobs = {job.id: job for job in claimed}
    # `start` once: a job claimed again (its worker died) has started already.
    await webhooks.record(
        session,
        [
            _announce(job.owner_id, job.webhook_url, job.id, "start")
            for job in jobs.values()
            if job.attempts == 1 and webhooks.wanted(job.webhook_url, job.webhook_events, "start")
        ],
    )
    return jobs


def _announce(owner_id: str, url: str | None, job_id: str, event: str) -> webhooks.Announcement:
    assert url is not None
    return webhooks.Announcement(owner_id, url, "job", job_id, event)


async def renew_leases(
    session: AsyncSession, worker_id: str, job_ids: Sequence[str], lease_seconds: float
) -> None:
    if not job_ids:
        return
    await session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
    )


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a worker records when its attempt ends."""

    status: JobStatus
    deltas: list[str]
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int
    first_token_at: datetime | None
    error: str | None = None
    # When this attempt's claim started it (the claimed row's started_at): with
    # first_token_at it gives the job's time to first token.
    started_at: datetime | None = None
    # A failure's kind ("invalid_request" or "server_error"; see Job.error_code).
    error_code: str | None = None
    # Per delta, its tokens' logprobs (None unless the request asked for them).
    logprobs: list[list[dict[str, Any]]] | None = None
    # The tools the reply calls and its content without them (worker/tool_calls.py).
    tool_calls: list[dict[str, Any]] | None = None
    result_content: str | None = None


async def finish_job(
    session: AsyncSession, job_id: str, worker_id: str, outcome: JobOutcome
) -> bool:
    """`finish_jobs` for one job."""
    return (await finish_jobs(session, worker_id, [(job_id, outcome)]))[0]


_jobs = cast(Table, Job.__table__)  # Core: an executemany, not ORM bulk update by key
# One statement for every job of a group, run as an executemany (one pipelined round trip
# on asyncpg): under load, a batch's lines ending together queued behind per-job
# statements (bench/README.md). `s_keep` is the
# status a cancelled outcome leaves as it is; NULL `s_status` keeps the row's status.
_FINISH = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("s_id"),
        _jobs.c.worker_id == bindparam("s_worker"),
        _jobs.c.status.in_([JobStatus.RUNNING.value, bindparam("s_keep")]),
    )
    .values(
        status=func.coalesce(bindparam("s_status", type_=_jobs.c.status.type), _jobs.c.status),
        deltas=bindparam("s_deltas", type_=_jobs.c.deltas.type),
        result_text=bindparam("s_text"),
        finish_reason=bindparam("s_finish_reason"),
        prompt_tokens=bindparam("s_prompt_tokens", type_=_jobs.c.prompt_tokens.type),
        completion_tokens=bindparam("s_completion_tokens"),
        first_token_at=bindparam("s_first_token_at", type_=_jobs.c.first_token_at.type),
        ttft_ms=bindparam("s_ttft_ms", type_=_jobs.c.ttft_ms.type),
        error=bindparam("s_error", type_=_jobs.c.error.type),
        error_code=bindparam("s_error_code", type_=_jobs.c.error_code.type),
        logprobs=bindparam("s_logprobs", type_=_jobs.c.logprobs.type),
        tool_calls=bindparam("s_tool_calls", type_=_jobs.c.tool_calls.type),
        result_content=bindparam("s_result_content", type_=_jobs.c.result_content.type),
        finished_at=bindparam("s_finished_at", type_=_jobs.c.finished_at.type),
        lease_expires_at=None,
    )
)


async def finish_jobs(
    session: AsyncSession, worker_id: str, outcomes: Sequence[tuple[str, JobOutcome]]
) -> list[bool]:
    """Record the end of this worker's attempts; for each, whether it landed.

    A succeeded/failed outcome only lands while the job is still ours and running. A job
    cancelled under us keeps status `cancelled`, but its partial output is recorded.
    A success that lands appends the job's turn and reply to its conversation, in this
    same transaction: exactly once, and never for a failed or cancelled job.
    """
    if not outcomes:
        return []
    now = utcnow()
    params = []
    for job_id, outcome in outcomes:
        ttft_ms = None
        if outcome.first_token_at is not None and outcome.started_at is not None:
            ttft_ms = int((outcome.first_token_at - outcome.started_at).total_seconds() * 1000)
        cancelled = outcome.status == JobStatus.CANCELLED
        params.append(
            {
                "s_id": job_id,
                "s_worker": worker_id,
                "s_keep": JobStatus.CANCELLED.value if cancelled else JobStatus.RUNNING.value,
                "s_status": None if cancelled else outcome.status.value,
                "s_deltas": outcome.deltas,
                "s_text": "".join(outcome.deltas),
                "s_finish_reason": outcome.finish_reason,
                "s_prompt_tokens": outcome.prompt_tokens,
                "s_completion_tokens": outcome.completion_tokens,
                "s_first_token_at": outcome.first_token_at,
                "s_ttft_ms": ttft_ms,
                "s_error": outcome.error,
                "s_finished_at": now,
                "s_error_code": outcome.error_code,
                "s_logprobs": outcome.logprobs,
                "s_tool_calls": outcome.tool_calls,
                "s_result_content": outcome.result_content,
            }
        )
    await session.execute(_FINISH, params)
    # Which landed: ours, and stamped with this group's finish time just now.
    ids = [job_id for job_id, _ in outcomes]
    rows = (
        await session.execute(
            select(
                Job.id, Job.conversation_id, Job.owner_id, Job.webhook_url, Job.webhook_events
            ).where(Job.id.in_(ids), Job.worker_id == worker_id, Job.finished_at == now)
        )
    ).all()
    landed = {row.id: row.conversation_id for row in rows}
    # A cancelled job was announced by its cancel (`cancel_job`); these end here.
    ended = {o_id for o_id, outcome in outcomes if outcome.status != JobStatus.CANCELLED}
    await webhooks.record(
        session,
        [
            _announce(row.owner_id, row.webhook_url, row.id, "completed")
            for row in rows
            if row.id in ended and webhooks.wanted(row.webhook_url, row.webhook_events, "completed")
        ],
    )
    for job_id, outcome in outcomes:
        if (
            outcome.status == JobStatus.SUCCEEDED
            and job_id in landed
            and landed[job_id] is not None
        ):
            job = await session.get(Job, job_id, populate_existing=True)
            assert job is not None
            await conversations.record_reply(session, job, "".join(outcome.deltas))
    return [job_id in landed for job_id, _ in outcomes]


async def release_job(session: AsyncSession, job_id: str, worker_id: str) -> None:
    """Give a running job back to the queue (its worker's engine broke); the reconciler
    sends it to another worker."""
    await session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(status=JobStatus.QUEUED, worker_id=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


async def count_queued(session: AsyncSession, owner_id: str, up_to: int) -> int:
    """The key's queued interactive jobs, counted up to `up_to` (enough to compare with
    its max_queued_jobs: a key with 10,000 queued costs no more than one with `up_to`).
    Through ix_jobs_owner_queued: the predicate is its own, word for word."""
    if up_to <= 0:
        return 0
    queued = (
        select(literal(1))
        .select_from(Job)
        .where(Job.owner_id == owner_id, text(INTERACTIVE_QUEUED))
        .limit(up_to)
        .subquery()
    )
    return int(await session.scalar(select(func.count()).select_from(queued)) or 0)


async def open_jobs_by_model(session: AsyncSession) -> dict[str, int]:
    """Jobs not ended (queued or running), per model: what the `jobs_open` counter of
    /metrics should read (the reconciler corrects it from this now and then)."""
    rows = await session.execute(
        select(Job.model, func.count())
        .where(Job.status.in_((JobStatus.QUEUED, JobStatus.RUNNING)))
        .group_by(Job.model)
    )
    return {model: int(count) for model, count in rows.tuples()}


async def count_held_for_model(session: AsyncSession, model: str, up_to: int) -> int:
    """The model's interactive jobs accepted and not yet released to its workers (its
    backlog), counted up to `up_to`: through ix_jobs_interactive_held, whose predicate
    this is word for word, so a backlog of millions costs what one of `up_to` does."""
    if up_to <= 0:
        return 0
    held = (
        select(literal(1))
        .select_from(Job)
        .where(Job.model == model, text(INTERACTIVE_HELD))
        .limit(up_to)
        .subquery()
    )
    return int(await session.scalar(select(func.count()).select_from(held)) or 0)


async def is_cancelled(session: AsyncSession, job_id: str) -> bool:
    status = await session.scalar(select(Job.status).where(Job.id == job_id))
    return status == JobStatus.CANCELLED


async def cancelled_among(session: AsyncSession, job_ids: Sequence[str]) -> list[str]:
    """Which of these jobs have been cancelled (a worker's check on its own jobs)."""
    rows = await session.scalars(
        select(Job.id).where(Job.id.in_(job_ids), Job.status == JobStatus.CANCELLED)
    )
    return list(rows)


async def cancel_job(session: AsyncSession, job_id: str) -> JobStatus | None:
    """Cancel a queued or running job; returns the status it had, None if already final."""
    for previous in (JobStatus.QUEUED, JobStatus.RUNNING):
        row = (
            await session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == previous)
                .values(status=JobStatus.CANCELLED, finished_at=utcnow())
                .returning(Job.owner_id, Job.webhook_url, Job.webhook_events)
                .execution_options(synchronize_session=False)
            )
        ).one_or_none()
        if row is not None:
            if webhooks.wanted(row.webhook_url, row.webhook_events, "completed"):
                await webhooks.record(
                    session, [_announce(row.owner_id, row.webhook_url, job_id, "completed")]
                )
            return previous
    return None


async def delete_finished_job(session: AsyncSession, job_id: str) -> bool:
    """Delete a finished job outside any batch; False if it is not (or no longer) one."""
    result = await session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.status.in_(TERMINAL_STATUSES), Job.batch_id.is_(None))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


EXPIRED_MESSAGE = "The job was still queued at its deadline (deadline_at), so it never ran."


async def expire_due(
    session: AsyncSession, *, limit: int, job_ids: Sequence[str] | None = None
) -> list[Job]:
    """End queued jobs whose deadline has passed (`expired`), oldest deadline first, at
    most `limit` (or only those among `job_ids`: a worker's claim); the rows ended.

    A conditional update, so a job claimed, cancelled or expired meanwhile by another
    process is left alone; rows another transaction holds are skipped, not waited for.
    Each ended job that wants it gets its webhook's `completed` delivery, as a cancel does.
    """
    now = utcnow()
    due = select(Job.id).where(text(QUEUED_WITH_DEADLINE), Job.deadline_at <= now)
    # A claim's few ids are found by key; the sweep reads the index in deadline order.
    due = due.where(Job.id.in_(job_ids)) if job_ids is not None else due.order_by(Job.deadline_at)
    due = due.limit(limit).with_for_update(skip_locked=True)
    ended = await session.scalars(
        update(Job)
        .where(Job.id.in_(due.scalar_subquery()), Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.EXPIRED,
            finished_at=now,
            error=EXPIRED_MESSAGE,
            error_code=EXPIRED,
            lease_expires_at=None,
        )
        .returning(Job),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    jobs = list(ended)
    await webhooks.record(
        session,
        [
            _announce(job.owner_id, job.webhook_url, job.id, "completed")
            for job in jobs
            if webhooks.wanted(job.webhook_url, job.webhook_events, "completed")
        ],
    )
    return jobs


@dataclass(frozen=True, slots=True)
class StrandedJob:
    id: str
    model: str
    lane: Lane
    priority: int
    status: JobStatus


async def find_stranded_jobs(
    session: AsyncSession,
    *,
    queued_before: datetime,
    lease_expired_before: datetime,
    limit: int,
    after: str | None = None,
) -> list[StrandedJob]:
    """Jobs that may have lost their Celery message: old `queued` ones, and `running` ones
    whose worker stopped renewing its lease. A page in id order: `after` is the last id of
    the page before."""
    query = (
        select(Job.id, Job.model, Job.lane, Job.priority, Job.status)
        .where(
            or_(
                and_(
                    Job.status == JobStatus.QUEUED,
                    func.coalesce(Job.enqueued_at, Job.created_at) < queued_before,
                    # A batch line not sent yet waits for the batch feeder (api/batches),
                    # an interactive job not released yet for the dispatcher
                    # (api/jobs/dispatch.py): neither is stranded.
                    or_(
                        Job.enqueued_at.is_not(None),
                        and_(Job.batch_id.is_(None), Job.lane != Lane.INTERACTIVE),
                    ),
                ),
                and_(
                    Job.status == JobStatus.RUNNING,
                    Job.lease_expires_at < lease_expired_before,
                ),
            )
        )
        .order_by(Job.id)
        .limit(limit)
    )
    if after is not None:
        query = query.where(Job.id > after)
    rows = (await session.execute(query)).all()
    return [StrandedJob(r.id, r.model, r.lane, r.priority, r.status) for r in rows]
