"""The dispatcher's queries (api/jobs/dispatch.py): interactive jobs held in SQL
(`queued`, `enqueued_at` NULL) and released to the workers key by key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.keys import Lane
from storage.models import INTERACTIVE_HELD, INTERACTIVE_OPEN, ApiKey, Job

# pg_advisory_xact_lock's key for a dispatch pass: one pass at a time across API replicas,
# so two never fill the same window.
_DISPATCH_LOCK = 0x46455252_59445350  # "FERRYDSP"


@dataclass(frozen=True, slots=True)
class Held:
    model: str
    owner_id: str
    count: int
    # The owner's oldest held job: among keys equally served, the one waiting longest goes
    # first.
    oldest: str


@dataclass(frozen=True, slots=True)
class Released:
    id: str
    model: str
    lane: Lane
    priority: int
    owner_id: str


async def lock_pass(session: AsyncSession) -> None:
    """Serialise dispatch passes across processes until this transaction ends (PostgreSQL;
    SQLite is one embedded process, whose dispatcher runs one pass at a time)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(_DISPATCH_LOCK)))


async def held(session: AsyncSession) -> list[Held]:
    """Held interactive jobs per model and key."""
    query = (
        select(Job.model, Job.owner_id, func.count(), func.min(Job.id))
        .where(text(INTERACTIVE_HELD))
        .group_by(Job.model, Job.owner_id)
    )
    return [Held(m, o, int(n), str(first)) for m, o, n, first in (await session.execute(query))]


async def released(session: AsyncSession) -> dict[tuple[str, str], int]:
    """Interactive jobs released and not finished, per (model, key)."""
    query = (
        select(Job.model, Job.owner_id, func.count())
        .where(text(INTERACTIVE_OPEN), Job.enqueued_at.is_not(None))
        .group_by(Job.model, Job.owner_id)
    )
    return {(m, o): int(n) for m, o, n in (await session.execute(query)).all()}


async def release(
    session: AsyncSession, owner_id: str, models: Sequence[str], limit: int, at: datetime
) -> list[Released]:
    """Mark the key's next `limit` held jobs on these models released (most urgent
    priority first, then oldest); returns them. Rows another transaction holds (a cancel
    in progress) are skipped."""
    pick = (
        select(Job.id)
        .where(text(INTERACTIVE_HELD), Job.owner_id == owner_id, Job.model.in_(models))
        .order_by(Job.priority, Job.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)
    ids = list((await session.scalars(pick)).all())
    if not ids:
        return []
    rows = await session.execute(
        update(Job)
        .where(Job.id.in_(ids), text(INTERACTIVE_HELD))
        .values(enqueued_at=at)
        .returning(Job.id, Job.model, Job.lane, Job.priority, Job.owner_id)
        .execution_options(synchronize_session=False)
    )
    out = [Released(r.id, r.model, Lane(r.lane), r.priority, r.owner_id) for r in rows.all()]
    out.sort(key=lambda r: (r.priority, r.id))
    return out


async def stored_limits(session: AsyncSession, key_ids: Sequence[str]) -> dict[str, Any]:
    """The keys' own limits as stored (None: all defaults)."""
    if not key_ids:
        return {}
    query = select(ApiKey.id, ApiKey.limits).where(ApiKey.id.in_(key_ids))
    return {k: limits for k, limits in (await session.execute(query)).all()}
