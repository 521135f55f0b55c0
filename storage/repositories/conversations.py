"""Every query on conversations and their messages.

A conversation belongs to one API key. Its messages are appended only by a job that
succeeds (`record_reply`, called inside `jobs.finish_job`'s transaction): the turn the job
carried and the reply go in together, so a failed or cancelled job leaves no trace and a
reply is never appended twice.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from storage.content import ImageRef, image_refs, plain_text, split_reasoning
from storage.models import Conversation, Job, Message, utcnow
from storage.stored_request import StoredRequest

_TITLE_CHARS = 80
# Roles that are instructions for one request, not turns of the conversation.
INSTRUCTION_ROLES = frozenset({"system", "developer"})


_last_micros = 0


def new_conversation_id() -> str:
    """Time-ordered, so "newest first" and cursors are ORDER BY id: microseconds (never
    repeated within a process, so one client's conversations keep their order), then
    random digits."""
    global _last_micros
    _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
    return f"conv_{_last_micros:014x}{secrets.token_hex(5)}"


@dataclass(frozen=True, slots=True)
class NewMessage:
    role: str
    content: str
    images: list[ImageRef] | None = None
    reasoning: str | None = None


async def create(session: AsyncSession, owner_id: str, title: str | None = None) -> Conversation:
    now = utcnow()
    conversation = Conversation(
        id=new_conversation_id(), owner_id=owner_id, title=title, created_at=now, updated_at=now
    )
    session.add(conversation)
    await session.flush()
    return conversation


async def get_owned(
    session: AsyncSession, conversation_id: str, owner_id: str
) -> Conversation | None:
    """A conversation only exists for the key that owns it."""
    conversation = await session.get(Conversation, conversation_id)
    if conversation is None or conversation.owner_id != owner_id:
        return None
    return conversation


async def list_owned(
    session: AsyncSession, owner_id: str, *, after: str | None, limit: int
) -> list[Conversation]:
    """Newest first; `after` is the last id of the previous page."""
    query = select(Conversation).where(Conversation.owner_id == owner_id)
    if after is not None:
        query = query.where(Conversation.id < after)
    query = query.order_by(Conversation.id.desc()).limit(limit)
    return list((await session.scalars(query)).all())


async def messages_of(session: AsyncSession, conversation_id: str) -> list[Message]:
    """The conversation's messages in the order they were appended."""
    query = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id)
    return list((await session.scalars(query)).all())


async def reply_tokens(session: AsyncSession, messages: Sequence[Message]) -> dict[str, int]:
    """How many tokens each reply among `messages` took, as its job counted them."""
    job_ids = {m.job_id for m in messages if m.role == "assistant" and m.job_id}
    if not job_ids:
        return {}
    rows = await session.execute(
        select(Job.id, Job.completion_tokens).where(
            Job.id.in_(job_ids), Job.completion_tokens.is_not(None)
        )
    )
    return {job_id: tokens for job_id, tokens in rows.all() if tokens is not None}


async def append(
    session: AsyncSession,
    conversation_id: str,
    messages: Sequence[NewMessage],
    *,
    job_id: str | None = None,
) -> bool:
    """Append messages in order; False (nothing written) if the conversation is gone.

    The conversation row is updated first: that locks it, so a concurrent delete either
    waits for this transaction (and takes the new messages with it) or has already
    removed the row (and nothing is written).
    """
    now = utcnow()
    first_user = next((m.content for m in messages if m.role == "user" and m.content), None)
    title = first_user[:_TITLE_CHARS] if first_user else None
    touched = await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(updated_at=now, title=func.coalesce(Conversation.title, title))
        .returning(Conversation.id)
        .execution_options(synchronize_session=False)
    )
    if touched.scalar_one_or_none() is None:
        return False
    if messages:
        rows = [
            {
                "conversation_id": conversation_id,
                "role": m.role,
                "content": m.content,
                "images": [dict(ref) for ref in m.images] if m.images else None,
                "reasoning": m.reasoning,
                "job_id": job_id,
                "created_at": now,
            }
            for m in messages
        ]
        # One INSERT per row: ids (the order of messages) follow the list's order.
        for row in rows:
            await session.execute(insert(Message).values(**row))
    return True


def turn_of(request: StoredRequest) -> list[NewMessage]:
    """The turn a job carries into its conversation: the messages from `turn_start` on,
    instructions (system/developer) left out, images kept as references."""
    messages = request.messages or []
    turn = messages[request.turn_start or 0 :]
    return [
        NewMessage(
            role=m["role"],
            content=plain_text(m.get("content")),
            images=image_refs(m.get("content")) or None,
        )
        for m in turn
        if m["role"] not in INSTRUCTION_ROLES
    ]


async def record_reply(session: AsyncSession, job: Job, reply: str) -> bool:
    """Append a succeeded job's turn and its reply (reasoning split out) to the job's
    conversation. Called in the transaction that records the success."""
    if job.conversation_id is None:
        return False
    # A reply that opens with `<think>` is split even without thinking asked for.
    request = StoredRequest.load(job.request)
    reasoning, content = split_reasoning(reply, request.reasoning or "tagged")
    turn = [*turn_of(request), NewMessage("assistant", content, reasoning=reasoning)]
    return await append(session, job.conversation_id, turn, job_id=job.id)


async def delete_owned(session: AsyncSession, conversation_id: str, owner_id: str) -> bool:
    """Delete a conversation and its messages; its jobs stay, unlinked (SET NULL)."""
    result = await session.execute(
        delete(Conversation)
        .where(Conversation.id == conversation_id, Conversation.owner_id == owner_id)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def clear(session: AsyncSession, conversation_id: str) -> None:
    """Forget every message; the conversation itself (and its id) stays."""
    await session.execute(delete(Message).where(Message.conversation_id == conversation_id))
    await session.execute(
        update(Conversation)
        .where(Conversation.id == conversation_id)
        .values(updated_at=utcnow(), title=None)
        .execution_options(synchronize_session=False)
    )


async def find_default(session: AsyncSession, owner_id: str) -> Conversation | None:
    return await session.scalar(select(Conversation).where(Conversation.default_for == owner_id))


async def default_conversation(session: AsyncSession, owner_id: str) -> Conversation:
    """The key's default conversation (PAI-EAS's server-side history), created on first
    use. Race-safe: `default_for` is unique, and a losing insert does nothing."""
    found = await find_default(session, owner_id)
    if found is not None:
        return found
    now = utcnow()
    values = {
        "id": new_conversation_id(),
        "owner_id": owner_id,
        "default_for": owner_id,
        "created_at": now,
        "updated_at": now,
    }
    dialect = session.get_bind().dialect.name
    upsert = (
        postgresql.insert(Conversation) if dialect == "postgresql" else sqlite.insert(Conversation)
    )
    await session.execute(
        upsert.values(**values).on_conflict_do_nothing(index_elements=["default_for"])
    )
    created = await find_default(session, owner_id)
    assert created is not None
    return created
