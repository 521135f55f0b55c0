"""API keys: only a SHA-256 of each bearer token is ever stored."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select
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


async def find_key(session: AsyncSession, token: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))
