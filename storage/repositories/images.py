"""Who may read a stored image: images are stored once by content hash, and each key that
sent one is recorded as one of its owners."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ImageOwner, utcnow


async def add_owner(session: AsyncSession, owner_id: str, sha256s: Iterable[str]) -> None:
    """Record `owner_id` as an owner of these images (idempotent, race-safe)."""
    rows = [{"sha256": sha, "owner_id": owner_id, "created_at": utcnow()} for sha in sha256s]
    if not rows:
        return
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    await session.execute(insert(ImageOwner).values(rows).on_conflict_do_nothing())


async def owns(session: AsyncSession, owner_id: str, sha256: str) -> bool:
    found = await session.scalar(
        select(ImageOwner.sha256).where(
            ImageOwner.sha256 == sha256, ImageOwner.owner_id == owner_id
        )
    )
    return found is not None
