"""Who may read a stored image: images are stored once by content hash, and each key that
sent one is recorded as one of its owners."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ImageOwner, utcnow


async def add_owner(session: AsyncSession, owner_id: str, sha256s: Iterable[str]) -> None:
    """Record `owner_id` as an owner of these images, used now (idempotent, race-safe).
    Call it for every job or stored message that refers to them: the retention sweep
    reads `last_used_at` as the time of the key's latest reference."""
    now = utcnow()
    rows = [
        {"sha256": sha, "owner_id": owner_id, "created_at": now, "last_used_at": now}
        for sha in sorted(set(sha256s))
    ]
    if not rows:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    statement = insert(ImageOwner).values(rows)
    await session.execute(
        statement.on_conflict_do_update(
            index_elements=["sha256", "owner_id"],
            set_={"last_used_at": statement.excluded.last_used_at},
        )
    )


async def hold_for_use(session: AsyncSession, sha256s: Iterable[str]) -> None:
    """Until the transaction ends, keep the retention sweep from deleting these images
    (a shared lock per image; the sweep takes it exclusively, storage/repositories/
    retention.py). Hold it from recording an owner until the bytes are stored."""
    if session.get_bind().dialect.name != "postgresql":
        return
    for sha in sorted(set(sha256s)):
        await session.execute(select(func.pg_advisory_xact_lock_shared(image_lock_key(sha))))


def image_lock_key(sha256: str) -> int:
    """The advisory-lock key of an image: its hash's first 63 bits, as a bigint."""
    return int(sha256[:16], 16) >> 1


async def owns(session: AsyncSession, owner_id: str, sha256: str) -> bool:
    found = await session.scalar(
        select(ImageOwner.sha256).where(
            ImageOwner.sha256 == sha256, ImageOwner.owner_id == owner_id
        )
    )
    return found is not None
