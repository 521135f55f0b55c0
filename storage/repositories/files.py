"""Every query on files (batch inputs, outputs and error files). The bytes themselves are
in the object store under `storage.objects.file_key(id)`."""

from __future__ import annotations

import secrets
import time

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import File


def new_file_id() -> str:
    """Time-ordered, like job ids (newest first is ORDER BY id), in OpenAI's `file-` form."""
    return f"file-{int(time.time() * 1000):012x}{secrets.token_hex(6)}"


async def add_file(session: AsyncSession, file: File) -> None:
    session.add(file)
    await session.flush()


async def add_file_once(session: AsyncSession, file: File) -> None:
    """Store the row unless a row with its id exists (finalizing a batch again after a
    crash writes the same file ids)."""
    if await session.get(File, file.id) is None:
        await add_file(session, file)


async def get_owned_file(session: AsyncSession, file_id: str, owner_id: str) -> File | None:
    """A file only exists for the key that owns it."""
    file = await session.get(File, file_id)
    if file is None or file.owner_id != owner_id:
        return None
    return file


async def list_owned_files(
    session: AsyncSession,
    owner_id: str,
    *,
    purpose: str | None,
    after: str | None,
    limit: int,
    newest_first: bool = True,
) -> list[File]:
    """`after` is the last id of the previous page, in the order asked for."""
    query = select(File).where(File.owner_id == owner_id)
    if purpose is not None:
        query = query.where(File.purpose == purpose)
    if after is not None:
        query = query.where(File.id < after if newest_first else File.id > after)
    order = File.id.desc() if newest_first else File.id.asc()
    return list((await session.scalars(query.order_by(order).limit(limit))).all())


async def delete_file(session: AsyncSession, file_id: str) -> bool:
    result = await session.execute(delete(File).where(File.id == file_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]
