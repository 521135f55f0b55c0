"""API keys: only a SHA-256 of each bearer token is ever stored."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ApiKey, utcnow


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def ensure_keys(session: AsyncSession, tokens: Iterable[str]) -> list[ApiKey]:
    """Store the given tokens' hashes as `env` keys (idempotent; several API processes may
    start at once) and return their rows. A listed key that was revoked is not revived:
    revocation is for good. `env` keys no longer listed are revoked."""
    rows = []
    digests = []
    for token in tokens:
        digest = hash_key(token)
        digests.append(digest)
        row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if row is None:
            try:
                async with session.begin_nested():
                    row = ApiKey(
                        id=new_key_id(), key_hash=digest, name=token[:4] + "…", source="env"
                    )
                    session.add(row)
            except IntegrityError:  # another process made it first
                row = await session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if row is not None:
            rows.append(row)
    unlisted = (
        update(ApiKey)
        .where(ApiKey.source == "env", ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow(), updated_at=utcnow())
    )
    if digests:
        unlisted = unlisted.where(ApiKey.key_hash.not_in(digests))
    await session.execute(unlisted)
    return rows


def new_key_id() -> str:
    return f"key_{secrets.token_hex(8)}"


def new_token() -> str:
    """A new bearer token: `sk-ferry-` and 32 random bytes (URL-safe base64)."""
    return "sk-ferry-" + secrets.token_urlsafe(32)


async def get_key(session: AsyncSession, key_id: str) -> ApiKey | None:
    return await session.get(ApiKey, key_id)


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
                        source="builtin",
                    )
                )
        except IntegrityError:
            pass  # another process made it first
    return BUILTIN_OWNER_ID


async def find_key(session: AsyncSession, token: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))


def new_webhook_secret() -> str:
    """A Standard Webhooks signing secret: `whsec_` and 32 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def webhook_secret(session: AsyncSession, key_id: str) -> str:
    """The key's webhook signing secret, made on first use. Race-safe: the secret is only
    set while still NULL, so API processes asking at once all read the one that won."""
    query = select(ApiKey.webhook_secret).where(ApiKey.id == key_id)
    secret = await session.scalar(query)
    if secret is None:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id, ApiKey.webhook_secret.is_(None))
            .values(webhook_secret=new_webhook_secret())
            .execution_options(synchronize_session=False)
        )
        secret = await session.scalar(query)
    if secret is None:
        raise LookupError(f"no API key {key_id}")
    return secret
