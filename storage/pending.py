"""Jobs whose Celery message was sent and not yet claimed: one Redis sorted set.

The API's sending thread marks jobs (score: the send time) just before it sends them, the
worker that claims a job unmarks it, the reconciler reads the marks to tell a message
still on its way from a lost one, and /metrics counts them. The sending thread uses a
blocking client (`SyncPendingJobs`); everything else is on the event loop (`PendingJobs`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from storage.keys import PENDING_JOBS


class PendingJobs:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def mark(self, job_ids: Collection[str], at: float) -> None:
        if job_ids:
            await self._redis.zadd(PENDING_JOBS, dict.fromkeys(job_ids, at))

    async def unmark(self, job_ids: Collection[str]) -> None:
        if job_ids:
            await self._redis.zrem(PENDING_JOBS, *job_ids)

    async def marked_at(self, job_ids: Sequence[str]) -> list[float | None]:
        """When each job was marked (epoch seconds), None where it is not: one round trip."""
        if not job_ids:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.zscore(PENDING_JOBS, job_id)
        return list(await pipe.execute())

    async def contains(self, job_id: str) -> bool:
        return await self._redis.zscore(PENDING_JOBS, job_id) is not None

    async def count(self) -> int:
        return int(await self._redis.zcard(PENDING_JOBS))

    @staticmethod
    def count_in(pipe: Pipeline) -> None:
        """Adds the count to a caller's pipeline (its result: an int, in that place)."""
        pipe.zcard(PENDING_JOBS)


class SyncPendingJobs:
    """The same set through a blocking client, for a thread off the event loop."""

    def __init__(self, redis: SyncRedis) -> None:
        self._redis = redis

    def mark(self, job_ids: Collection[str], at: float) -> None:
        if job_ids:
            self._redis.zadd(PENDING_JOBS, dict.fromkeys(job_ids, at))

    def contains(self, job_id: str) -> bool:
        return self._redis.zscore(PENDING_JOBS, job_id) is not None

    def count(self) -> int:
        return int(self._redis.zcard(PENDING_JOBS))
