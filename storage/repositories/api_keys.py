"""API keys: only a SHA-256 of each bearer token is ever stored."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Insert, literal, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import ApiKey, utcnow


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def ensure_keys(session: AsyncSession, tokens: Iterable[str]) -> list[ApiKey]:
    """Store the given tokens' hashes as `env` keys and return their rows, in the tokens'
    order. An upsert: API processes starting at once on the same list all succeed. A
    listed key that was revoked stays revoked: revocation is for good."""
    digests = {hash_key(token): token for token in tokens}
    if not digests:
        return []
    now = utcnow()
    rows = [
        {
            "id": new_key_id(),
            "key_hash": digest,
            "name": token[:4] + "…",
            "source": "env",
            "created_at": now,
        }
        for digest, token in digests.items()
    ]
    await session.execute(_insert_new(session, rows))
    found = await session.scalars(select(ApiKey).where(ApiKey.key_hash.in_(digests)))
    by_hash = {row.key_hash: row for row in found}
    return [by_hash[digest] for digest in digests]


async def revoke_unlisted(session: AsyncSession, tokens: Iterable[str]) -> int:
    """Revoke the `env` keys (from FERRY_API_KEYS) whose token is not among `tokens`, the
    list now in force; admin-made keys are untouched. How many were revoked."""
    digests = [hash_key(token) for token in tokens]
    unlisted = (
        update(ApiKey)
        .where(ApiKey.source == "env", ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow(), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if digests:
        unlisted = unlisted.where(ApiKey.key_hash.not_in(digests))
    result = await session.execute(unlisted)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


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
    created once: an upsert, as several API processes may start at once."""
    row = {
        "id": BUILTIN_OWNER_ID,
        "key_hash": _BUILTIN_OWNER_HASH,
        "name": "built-in owner (authentication off)",
        "source": "builtin",
        "created_at": utcnow(),
    }
    await session.execute(_insert_new(session, [row]))
    return BUILTIN_OWNER_ID


def _insert_new(session: AsyncSession, rows: list[dict[str, Any]]) -> Insert:
    """INSERT of the rows whose id and hash are not taken yet (ON CONFLICT DO NOTHING, which
    both backends have in their own dialect)."""
    if session.get_bind().dialect.name == "postgresql":
        return pg_insert(ApiKey).values(rows).on_conflict_do_nothing()
    return sqlite_insert(ApiKey).values(rows).on_conflict_do_nothing()


async def find_key(session: AsyncSession, token: str) -> ApiKey | None:
    return await session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(token)))


# -- administration (/v1/admin/keys) ------------------------------------------------------


async def create_admin_key(
    session: AsyncSession, name: str, limits: dict[str, Any] | None
) -> tuple[ApiKey, str]:
    """A new `admin` key and its bearer token (the token is not kept: shown once)."""
    token = new_token()
    now = utcnow()
    row = ApiKey(
        id=new_key_id(),
        key_hash=hash_key(token),
        name=name,
        source="admin",
        limits=limits or None,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    await session.flush()
    return row, token


async def list_keys(session: AsyncSession, *, after: str | None, limit: int) -> Sequence[ApiKey]:
    """Every key, revoked ones too, newest first; `after` is the last id of the previous
    page (ids are random, so the cursor is that key's (created_at, id))."""
    query = select(ApiKey).order_by(ApiKey.created_at.desc(), ApiKey.id.desc()).limit(limit)
    if after is not None:
        after_created = select(ApiKey.created_at).where(ApiKey.id == after).scalar_subquery()
        query = query.where(
            tuple_(ApiKey.created_at, ApiKey.id) < tuple_(after_created, literal(after))
        )
    return (await session.scalars(query)).all()


async def update_key(
    session: AsyncSession,
    key_id: str,
    *,
    name: str | None = None,
    limits: dict[str, Any] | None = None,
) -> ApiKey | None:
    """Rename the key and/or replace its stored limits (`limits` is the whole new set, None
    leaves them, empty clears them: all defaults)."""
    row = await session.get(ApiKey, key_id, with_for_update=True)
    if row is None:
        return None
    if name is not None:
        row.name = name
    if limits is not None:
        row.limits = limits or None
    row.updated_at = utcnow()
    await session.flush()
    return row


async def revoke_key(session: AsyncSession, key_id: str) -> ApiKey | None:
    """Revoke the key for good (its rows stay); revoking it again keeps the first time."""
    row = await session.get(ApiKey, key_id, with_for_update=True)
    if row is None:
        return None
    if row.revoked_at is None:
        row.revoked_at = row.updated_at = utcnow()
        await session.flush()
    return row


# -- Standard Webhooks signing secrets ---------------------------------------------------


def new_webhook_secret() -> str:
    """`whsec_` and 32 random bytes in base64, as Standard Webhooks libraries read it."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def webhook_secret(session: AsyncSession, key_id: str) -> str:
    """The key's signing secret, made on first use (LookupError: no such key). Two
    processes making it at once agree: only the first UPDATE finds the column empty, and
    both then read what it wrote. Read first: once made, asking writes nothing."""
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
        raise LookupError(f"no API key `{key_id}`")
    return secret


async def rotate_webhook_secret(session: AsyncSession, key_id: str) -> str | None:
    """A new signing secret for the key (the old one stops signing); None: no such key."""
    secret = new_webhook_secret()
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .values(webhook_secret=secret, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return secret if result.rowcount else None  # type: ignore[attr-defined]
