"""API keys: only a SHA-256 of each bearer token is ever stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ApiKey


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def ensure_keys(session: AsyncSession, tokens: Iterable[str]) -> list[ApiKey]:
    """Store the given tokens' hashes (idempotent) and return their rows."""
    rows = []
    for token in tokens:
        digest = hash_key(token)
        row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if row is None:
            row = ApiKey(id=f"key_{secrets.token_hex(8)}", key_hash=digest, name=token[:4] + "…")
            session.add(row)
            await session.flush()
        rows.append(row)
    return rows


# The owner of every request when authentication is off (FERRY_AUTH=off). Its hash is not
# a SHA-256 digest, so no bearer token ever matches it: with keys back on it is unusable.
BUILTIN_OWNER_ID = "key_auth_off"
_BUILTIN_OWNER_HASH = "auth-off: no token matches this"


async def ensure_builtin_owner(session: AsyncSession) -> str:
    """The built-in owner's row (jobs, files, conversations reference an api_keys row),
    created once; several API processes may start at once."""
    if await session.get(ApiKey, BUILTIN_OWNER_ID) is None:
        try:
            async with session.begin_nested():
                session.add(
                    ApiKey(
                        id=BUILTIN_OWNER_ID,
                        key_hash=_BUILTIN_OWNER_HASH,
                        name="built-in owner (authentication off)",
                    )
                )
        except IntegrityError:
            pass  # another process made it first
    return BUILTIN_OWNER_ID


async def find_key(session: AsyncSession, token: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))
