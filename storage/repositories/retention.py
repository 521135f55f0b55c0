"""Every query of the retention sweep (api/ops/retention.py): rows past their age, deleted
a bounded batch at a time.

Each call deletes at most `limit` rows in one statement (selected through an index made for
it, storage/migrations 0009) and returns what it deleted; the caller commits between calls.
Candidates are taken with SKIP LOCKED: a row some request is working on is left for the
next pass instead of waited for.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import String, cast, delete, exists, func, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import (
    BATCH_ENDED,
    UNBATCHED_FINISHED,
    WEBHOOK_DONE,
    WITH_IMAGES,
    Batch,
    BatchLineError,
    BatchStatus,
    Conversation,
    File,
    ImageOwner,
    Job,
    JobStatus,
    Message,
    WebhookDelivery,
)
from storage.repositories.images import image_lock_key


def _rowcount(result: object) -> int:
    return int(result.rowcount)  # type: ignore[attr-defined]


async def delete_finished_jobs(session: AsyncSession, before: datetime, limit: int) -> list[str]:
    """Finished jobs outside batches that finished before `before`; their ids."""
    batch = (
        select(Job.id)
        .where(text(UNBATCHED_FINISHED), Job.finished_at < before)
        .order_by(Job.finished_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(delete(Job).where(Job.id.in_(batch)).returning(Job.id))
    return list(result.scalars())


OPEN_JOB = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True, slots=True)
class ConversationSweep:
    conversations: int
    statements: int


async def delete_idle_conversations(
    session: AsyncSession, before: datetime, limit: int
) -> ConversationSweep:
    """Conversations not updated since `before` and with no job queued or running on them,
    with their messages. As many as fit in `limit` rows (conversations and messages
    together; one larger than that goes alone, its messages `limit` at a time). The
    conversations stay locked until the caller commits: a job's reply (which updates the
    row first) waits, then finds it gone."""
    open_job = exists().where(Job.conversation_id == Conversation.id, Job.status.in_(OPEN_JOB))
    candidates = list(
        await session.scalars(
            select(Conversation.id)
            .where(Conversation.updated_at < before, ~open_job)
            .order_by(Conversation.updated_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if not candidates:
        return ConversationSweep(0, 0)
    counted = await session.execute(
        select(Message.conversation_id, func.count())
        .where(Message.conversation_id.in_(candidates))
        .group_by(Message.conversation_id)
    )
    counts = {conversation_id: n for conversation_id, n in counted.tuples()}
    taken: list[str] = []
    rows = 0
    for conversation_id in candidates:
        size = 1 + counts.get(conversation_id, 0)
        if taken and rows + size > limit:
            break
        taken.append(conversation_id)
        rows += size
    statements = 0
    while True:
        chunk = select(Message.id).where(Message.conversation_id.in_(taken)).limit(limit)
        statements += 1
        if _rowcount(await session.execute(delete(Message).where(Message.id.in_(chunk)))) < limit:
            break
    await session.execute(delete(Conversation).where(Conversation.id.in_(taken)))
    return ConversationSweep(len(taken), statements + 1)


OPEN_BATCH = [s for s in BatchStatus if not s.is_terminal]


async def delete_old_files(session: AsyncSession, before: datetime, limit: int) -> list[str]:
    """Files made before `before` that no unfinished batch reads or writes; their ids (the
    caller deletes their bytes once this is committed)."""
    in_use = exists().where(
        Batch.status.in_(OPEN_BATCH),
        or_(
            Batch.input_file_id == File.id,
            Batch.output_file_id == File.id,
            Batch.error_file_id == File.id,
        ),
    )
    batch = (
        select(File.id)
        .where(File.created_at < before, ~in_use)
        .order_by(File.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(delete(File).where(File.id.in_(batch)).returning(File.id))
    return list(result.scalars())


async def ended_batches(session: AsyncSession, before: datetime, limit: int) -> list[str]:
    """Batches made before `before` that have ended, oldest first."""
    query = (
        select(Batch.id)
        .where(text(BATCH_ENDED), Batch.created_at < before)
        .order_by(Batch.created_at)
        .limit(limit)
    )
    return list(await session.scalars(query))


async def delete_batch_lines(session: AsyncSession, batch_id: str, limit: int) -> int:
    """Up to `limit` of an ended batch's line jobs."""
    chunk = select(Job.id).where(Job.batch_id == batch_id).limit(limit)
    return _rowcount(await session.execute(delete(Job).where(Job.id.in_(chunk))))


async def delete_batch_line_errors(session: AsyncSession, batch_id: str, limit: int) -> int:
    """Up to `limit` of an ended batch's invalid-line records."""
    chunk = select(BatchLineError.id).where(BatchLineError.batch_id == batch_id).limit(limit)
    result = await session.execute(delete(BatchLineError).where(BatchLineError.id.in_(chunk)))
    return _rowcount(result)


async def delete_batch(session: AsyncSession, batch_id: str) -> bool:
    """The batch's row, once its lines and errors are gone (if it has ended)."""
    result = await session.execute(delete(Batch).where(Batch.id == batch_id, text(BATCH_ENDED)))
    return bool(_rowcount(result))


async def delete_done_webhooks(session: AsyncSession, before: datetime, limit: int) -> int:
    """Webhook messages made before `before` that were delivered or given up."""
    batch = (
        select(WebhookDelivery.id)
        .where(text(f"({WEBHOOK_DONE})"), WebhookDelivery.created_at < before)
        .order_by(WebhookDelivery.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = await session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(batch)))
    return _rowcount(result)


# --- images ---------------------------------------------------------------------------
#
# An image is stored once (by hash) and has an `image_owners` row per key that sent it;
# `last_used_at` is the time of that key's latest job or stored turn that refers to it
# (storage/repositories/images.py). So the references to check for an image are the key's
# jobs made up to then (an index range on the time-ordered job ids) and the key's stored
# turns that carry images (a partial index): a cheap check, for candidates only.

# Job ids are made in the same request that marks the image used, a moment apart.
_ID_SLACK = timedelta(hours=1)


async def unused_image_candidates(session: AsyncSession, before: datetime, limit: int) -> list[str]:
    """Images no key has used since `before`."""
    fresh = ImageOwner.__table__.alias("fresh")
    used_since = exists().where(fresh.c.sha256 == ImageOwner.sha256, fresh.c.last_used_at >= before)
    query = (
        select(ImageOwner.sha256)
        .where(ImageOwner.last_used_at < before, ~used_since)
        .distinct()
        .limit(limit)
    )
    return sorted(await session.scalars(query))


async def lock_image(session: AsyncSession, sha256: str) -> bool:
    """Take the image's lock for this transaction (False: an intake holds it, skip it).
    While it is held no request can record a new use or find its bytes present."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(
        await session.scalar(select(func.pg_try_advisory_xact_lock(image_lock_key(sha256))))
    )


def _job_id_bound(at: datetime) -> str:
    """The greatest job id made by time `at` (ids start with their milliseconds in hex)."""
    return f"job_{int((at + _ID_SLACK).timestamp() * 1000):012x}~"


async def image_referenced(session: AsyncSession, sha256: str) -> bool:
    """Whether a job or a stored turn of one of the image's owners still refers to it."""
    owners = (
        await session.execute(
            select(ImageOwner.owner_id, ImageOwner.last_used_at).where(ImageOwner.sha256 == sha256)
        )
    ).tuples()
    pattern = f"%{sha256}%"
    for owner_id, last_used_at in owners:
        in_job = await session.scalar(
            select(Job.id)
            .where(
                Job.owner_id == owner_id,
                Job.id <= _job_id_bound(last_used_at),
                cast(Job.request, String).like(pattern),
            )
            .limit(1)
        )
        if in_job is not None:
            return True
        in_turn = await session.scalar(
            select(Message.id)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(
                Conversation.owner_id == owner_id,
                text(f"messages.{WITH_IMAGES}"),
                cast(Message.images, String).like(pattern),
            )
            .limit(1)
        )
        if in_turn is not None:
            return True
    return False


async def mark_image_used(session: AsyncSession, sha256: str, at: datetime) -> None:
    """A candidate found still referenced: not a candidate again for a full age."""
    await session.execute(
        update(ImageOwner).where(ImageOwner.sha256 == sha256).values(last_used_at=at)
    )


async def delete_image_owners(session: AsyncSession, sha256: str, before: datetime) -> int:
    """The image's owner rows, if none was used since `before` (under the image's lock)."""
    fresh = exists().where(ImageOwner.sha256 == sha256, ImageOwner.last_used_at >= before)
    has_fresh = await session.scalar(select(fresh))
    if has_fresh:
        return 0
    result = await session.execute(delete(ImageOwner).where(ImageOwner.sha256 == sha256))
    return _rowcount(result)
