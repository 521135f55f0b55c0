"""The Redis locks that let one API process at a time do a periodic pass."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.lock import Lock

from storage.keys import (
    BATCH_SUPERVISOR_LOCK,
    EXPIRY_LOCK,
    METRICS_RESYNC_LOCK,
    RECONCILER_LOCK,
    RETENTION_LOCK,
)


async def take_reconciler_turn(redis: Redis, hold_ms: int) -> bool:
    """True when this process does the reconciler pass now. The turn is never released:
    it expires, so that processes ticking at once do the pass once between them."""
    return bool(await redis.set(RECONCILER_LOCK, "1", nx=True, px=hold_ms))


async def take_expiry_turn(redis: Redis, hold_ms: int) -> bool:
    """The expiry sweep's turn, taken and left to expire as the reconciler's is."""
    return bool(await redis.set(EXPIRY_LOCK, "1", nx=True, px=hold_ms))


async def take_metrics_resync_turn(redis: Redis, hold_ms: int) -> bool:
    """The open-job count correction's turn: taken by one process, left to expire."""
    return bool(await redis.set(METRICS_RESYNC_LOCK, "1", nx=True, px=hold_ms))


def batch_supervisor_lock(redis: Redis, timeout: float) -> Lock:
    """The lock of a batch supervisor pass: `acquire` does not wait, it answers whether
    this process has it; `release` when the pass is done (`timeout`: if it never is)."""
    return redis.lock(BATCH_SUPERVISOR_LOCK, timeout=timeout, blocking=False)


def retention_lock(redis: Redis, interval_seconds: float) -> Lock:
    """The retention sweep's turn: `acquire` does not wait. Never released, it expires
    after one interval, so processes ticking together sweep once between them; a sweep
    still running renews it (`reacquire`)."""
    return redis.lock(RETENTION_LOCK, timeout=interval_seconds, blocking=False)
