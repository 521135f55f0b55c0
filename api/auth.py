"""Bearer API keys: the token's SHA-256 is looked up once, then cached briefly."""

from __future__ import annotations

import time

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.errors import Unauthorized
from storage.repositories import api_keys

_CACHE_SECONDS = 60.0


class KeyRing:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._cache: dict[str, tuple[str, float]] = {}

    async def owner_of(self, authorization: str | None) -> str:
        """The key id behind an `Authorization: Bearer ...` header, or 401."""
        if not authorization or not authorization.lower().startswith("bearer "):
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        token = authorization[7:].strip()
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        async with self._sessions() as session:
            key = await api_keys.find_key(session, token)
        if key is None:
            raise Unauthorized("Incorrect API key provided.")
        self._cache[token] = (key.id, time.monotonic() + _CACHE_SECONDS)
        return key.id
