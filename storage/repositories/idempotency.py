"""Every query on `Idempotency-Key` records (api/core/idempotency.py has the rules).

A record is claimed by the request that inserts it (the primary key (owner, key) makes one
of racing replicas the winner), holds `locked_until` while that request creates its
object, then keeps the answer until `expires_at`. Times are the API's clock, as the
jobs' leases are.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, or_, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import IdempotencyRecord, Job


async def insert_claim(
    session: AsyncSession,
    owner_id: str,
    key: str,
    *,
    route: str,
    body_hash: str,
    now: datetime,
    locked_until: datetime,
    expires_at: datetime,
) -> bool:
    """Insert the record unless one exists for (owner, key): True when this call did.

    ON CONFLICT DO NOTHING: a concurrent insert of the same key makes this one wait for
    it to commit, then do nothing; exactly one of them wins."""
    values = {
        "owner_id": owner_id,
        "key": key,
        "route": route,
        "body_hash": body_hash,
        "locked_until": locked_until,
        "created_at": now,
        "expires_at": expires_at,
    }
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else pg_insert
    result = await session.execute(
        insert(IdempotencyRecord)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["owner_id", "key"])
        .returning(IdempotencyRecord.key)
    )
    return result.first() is not None


async def get_record(session: AsyncSession, owner_id: str, key: str) -> IdempotencyRecord | None:
    """The record as committed now (not a copy cached in the session)."""
    return (
        await session.scalars(
            select(IdempotencyRecord)
            .where(IdempotencyRecord.owner_id == owner_id, IdempotencyRecord.key == key)
            .execution_options(populate_existing=True)
        )
    ).first()


async def take_over(
    session: AsyncSession,
    owner_id: str,
    key: str,
    *,
    route: str,
    body_hash: str,
    now: datetime,
    locked_until: datetime,
    expires_at: datetime,
) -> bool:
    """Claim a record that counts as absent: expired, or claimed by a request whose lease
    lapsed before it recorded an answer (its process died). True when this call did; the
    condition is checked again under the row's lock, so one of racing callers wins."""
    record = IdempotencyRecord
    result = await session.execute(
        update(record)
        .where(
            record.owner_id == owner_id,
            record.key == key,
            or_(
                record.expires_at <= now,
                and_(record.response_status.is_(None), record.locked_until <= now),
            ),
        )
        .values(
            route=route,
            body_hash=body_hash,
            response_status=None,
            response_body=None,
            object_id=None,
            locked_until=locked_until,
            created_at=now,
            expires_at=expires_at,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def record_answer(
    session: AsyncSession,
    owner_id: str,
    key: str,
    *,
    locked_until: datetime,
    status: int,
    body: dict[str, Any],
    object_id: str | None,
) -> bool:
    """Store the answer of the claim that holds the record (`locked_until` is its own
    lease): False if the lease lapsed and another request took the record over."""
    record = IdempotencyRecord
    result = await session.execute(
        update(record)
        .where(
            record.owner_id == owner_id,
            record.key == key,
            record.response_status.is_(None),
            record.locked_until == locked_until,
        )
        .values(response_status=status, response_body=body, object_id=object_id, locked_until=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def release(session: AsyncSession, owner_id: str, key: str, locked_until: datetime) -> None:
    """Drop the claim of a request that created nothing (it failed), if it still holds it."""
    record = IdempotencyRecord
    await session.execute(
        delete(record).where(
            record.owner_id == owner_id,
            record.key == key,
            record.response_status.is_(None),
            record.locked_until == locked_until,
        )
    )


async def delete_expired(session: AsyncSession, now: datetime, limit: int = 1000) -> int:
    """Delete up to `limit` expired records (they are already treated as absent); for a
    periodic cleanup, in bounded batches so no sweep holds many row locks."""
    record = IdempotencyRecord
    batch = (
        select(record.owner_id, record.key)
        .where(record.expires_at <= now)
        .order_by(record.expires_at)
        .limit(limit)
    )
    keys = (await session.execute(batch)).all()
    if not keys:
        return 0
    result = await session.execute(
        delete(record).where(
            tuple_(record.owner_id, record.key).in_([tuple(k) for k in keys]),
            record.expires_at <= now,
        )
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def jobs_of(session: AsyncSession, job_ids: Sequence[str]) -> list[Job]:
    """The jobs a chat or completions request created, in `job_ids`' order (a replay
    answers from them); fewer if some are gone."""
    rows = {j.id: j for j in await session.scalars(select(Job).where(Job.id.in_(job_ids)))}
    return [rows[i] for i in job_ids if i in rows]
