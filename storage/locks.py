"""The Redis locks that let one API process at a time do a periodic pass."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from storage.keys import BATCH_SUPERVISOR_LOCK, RETENTION_LOCK


async def take_turn(redis: Redis, key: str, hold_ms: int) -> bool:
    """True when this process does the pass guarded by `key` (RECONCILER_LOCK, EXPIRY_LOCK,
    METRICS_RESYNC_LOCK) now. The turn is never released: it expires, so that processes
    ticking at once do the pass once between them."""
    return bool(await redis.set(key, "1", nx=True, px=hold_ms))


def batch_supervisor_lock(redis: Redis, timeout: float) -> Lock:
    """The lock of a batch supervisor pass: `acquire` does not wait, it answers whether
    this process has it; `release` when the pass is done (`timeout`: if it never is)."""
    return redis.lock(BATCH_SUPERVISOR_LOCK, timeout=timeout, blocking=False)


def retention_lock(redis: Redis, interval_seconds: float) -> Lock:
    """The retention sweep's turn: `acquire` does not wait. Never released, it expires
    after one interval, so processes ticking together sweep once between them; a sweep
    still running renews it (`reacquire`)."""
    return redis.lock(RETENTION_LOCK, timeout=interval_seconds, blocking=False)
