"""The pub/sub channels whose messages are a job id: cancel requests and batch wake-ups.

`CancelChannel`: the API asks whichever worker runs a job to abort it (a job cancelled, a
batch cancelled or expired). `BatchWakeChannel`: a worker says a batch line ended, so the
API's batch supervisor feeds the next lines at once instead of at its next timed pass.
`JobWakeChannel`: the same for interactive jobs and the dispatcher.
A message is a hint: whoever misses one (not subscribed, Redis gone) learns the same from
SQL on its next pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from storage.keys import BATCH_WAKE_CHANNEL, CANCEL_CHANNEL, JOB_WAKE_CHANNEL


class _JobIdChannel:
    _name: str

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def publish(self, job_id: str) -> None:
        await self._redis.publish(self._name, job_id)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[AsyncIterator[str]]:
        """Subscribed on a connection of its own while open: the job id of each message
        from then on. Reading raises what the connection raises (the caller decides
        whether to subscribe again)."""
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._name)
            yield _job_ids(pubsub)


class CancelChannel(_JobIdChannel):
    _name = CANCEL_CHANNEL


class BatchWakeChannel(_JobIdChannel):
    _name = BATCH_WAKE_CHANNEL


class JobWakeChannel(_JobIdChannel):
    """An interactive job ended: the API's dispatcher (api/jobs/dispatch.py) releases the
    next held one at once instead of at its next timed pass."""

    _name = JOB_WAKE_CHANNEL


async def _job_ids(pubsub: PubSub) -> AsyncIterator[str]:
    async for message in pubsub.listen():
        if message["type"] == "message":
            data = message["data"]
            yield data.decode() if isinstance(data, bytes) else data
