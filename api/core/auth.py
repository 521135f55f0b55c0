"""API keys: the token's SHA-256 is looked up once, then cached briefly.

Sent as `Authorization: Bearer <key>` (OpenAI) or as the bare key,
`Authorization: <key>` (how PAI-EAS clients send their service token)."""

from __future__ import annotations

import time

from api.core.db import Database
from api.core.errors import Unauthorized
from storage.repositories import api_keys

_CACHE_SECONDS = 60.0


class KeyRing:
    """`open_owner`: authentication is off (FERRY_AUTH=off); every request is this owner's,
    whatever its Authorization header says (none, `Bearer EMPTY`, any key)."""

    def __init__(self, db: Database, open_owner: str | None = None) -> None:
        self._db = db
        self._cache: dict[str, tuple[str, float]] = {}
        self._open_owner = open_owner

    async def owner_of(self, authorization: str | None) -> str:
        """The key id behind an `Authorization: Bearer <key>` or `Authorization: <key>`
        header, or 401."""
        if self._open_owner is not None:
            return self._open_owner
        token = token_of(authorization)
        if not token:
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        async with self._db.read() as session:
            key = await api_keys.find_key(session, token)
        if key is None:
            raise Unauthorized("Incorrect API key provided.")
        self._cache[token] = (key.id, time.monotonic() + _CACHE_SECONDS)
        return key.id


def token_of(authorization: str | None) -> str:
    """The key in an Authorization header value: after `Bearer `, or the bare value."""
    value = (authorization or "").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip()
    return value
