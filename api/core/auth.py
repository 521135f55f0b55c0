"""API keys: the token's SHA-256 is looked up, then trusted for `key_cache_seconds` (at
most 5 s, so a key revoked on one replica is refused by all of them within that).

Sent as `Authorization: Bearer <key>` (OpenAI) or as the bare key,
`Authorization: <key>` (how PAI-EAS clients send their service token)."""

from __future__ import annotations

import hmac
import time

from api.core.db import Database
from api.core.errors import Unauthorized
from api.core.limits import Caller, KeyLimits, stored_limits
from storage.repositories import api_keys


class KeyRing:
    """`open_owner`: authentication is off (FERRY_AUTH=off); every request is this owner's,
    whatever its Authorization header says (none, `Bearer EMPTY`, any key)."""

    def __init__(
        self,
        db: Database,
        open_owner: str | None = None,
        *,
        defaults: KeyLimits | None = None,
        admin_key: str | None = None,
        cache_seconds: float = 2.0,
    ) -> None:
        self._db = db
        self._cache: dict[str, tuple[Caller, float]] = {}
        self._open_owner = open_owner
        self._defaults = defaults or KeyLimits()
        self._admin_key = admin_key
        self._cache_seconds = cache_seconds

    async def owner_of(self, authorization: str | None) -> str:
        """The key id behind an `Authorization: Bearer <key>` or `Authorization: <key>`
        header, or 401."""
        return (await self.caller_of(authorization)).id

    async def caller_of(self, authorization: str | None) -> Caller:
        """The key behind the header with its effective limits, or 401 (also for a
        revoked key)."""
        if self._open_owner is not None:
            return await self._lookup_id(self._open_owner)
        token = token_of(authorization)
        if not token:
            raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        async with self._db.read() as session:
            key = await api_keys.find_key(session, token)
        if key is None or key.revoked_at is not None:
            self._cache.pop(token, None)
            raise Unauthorized("Incorrect API key provided.")
        caller = Caller(key.id, stored_limits(key.limits).over(self._defaults), key.name)
        self._remember(token, caller)
        return caller

    async def _lookup_id(self, key_id: str) -> Caller:
        """The built-in owner (authentication off), with its limits as stored."""
        hit = self._cache.get(key_id)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        async with self._db.read() as session:
            key = await api_keys.get_key(session, key_id)
        limits = stored_limits(key.limits if key else None).over(self._defaults)
        caller = Caller(key_id, limits, key.name if key else None)
        self._remember(key_id, caller)
        return caller

    def _remember(self, token: str, caller: Caller) -> None:
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: a flood of wrong keys must not grow it
        self._cache[token] = (caller, time.monotonic() + self._cache_seconds)

    def forget(self) -> None:
        """Drop every cached key (this process just changed one)."""
        self._cache.clear()

    def is_admin(self, authorization: str | None) -> bool:
        """Whether the header carries the admin key (FERRY_ADMIN_KEY); never with none set."""
        token = token_of(authorization)
        if not self._admin_key or not token:
            return False
        return hmac.compare_digest(token.encode(), self._admin_key.encode())


def token_of(authorization: str | None) -> str:
    """The key in an Authorization header value: after `Bearer `, or the bare value."""
    value = (authorization or "").strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        return rest.strip()
    return value
