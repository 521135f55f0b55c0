"""The owners of Ferry's Redis structures (storage/pending.py, channels.py, locks.py), on
a real Redis: what each caller reads back, and the keys and channels on the wire."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from storage.channels import BatchWakeChannel, CancelChannel
from storage.keys import BATCH_SUPERVISOR_LOCK, CANCEL_CHANNEL, PENDING_JOBS, RECONCILER_LOCK
from storage.locks import batch_supervisor_lock, take_turn
from storage.pending import PendingJobs, SyncPendingJobs
from tests.conftest import REDIS_BASE
from tests.helpers import empty_redis_db

pytestmark = pytest.mark.timeout(60)
URL = f"{REDIS_BASE}/9"  # no test stack uses db 9


async def test_pending_jobs_marks_unmarks_and_counts() -> None:
    async with empty_redis_db(URL) as client:
        pending = PendingJobs(client)
        await pending.mark(["a", "b"], 100.5)
        await pending.mark(["c"], 200.0)
        assert await client.zscore(PENDING_JOBS, "a") == 100.5  # the key the reconciler reads
        assert await pending.marked_at(["c", "x", "a"]) == [200.0, None, 100.5]
        assert await pending.contains("b")
        assert not await pending.contains("x")
        assert await pending.count() == 3

        await pending.unmark(["a", "x"])
        assert await pending.marked_at(["a", "b"]) == [None, 100.5]
        assert await pending.count() == 2

        # Nothing to do is no command (ZADD and ZREM refuse an empty list).
        await pending.mark([], 1.0)
        await pending.unmark([])
        assert await pending.marked_at([]) == []
        assert await pending.count() == 2


async def test_pending_count_goes_in_the_callers_pipeline() -> None:
    async with empty_redis_db(URL) as client:
        await PendingJobs(client).mark(["a", "b"], 1.0)
        pipe = client.pipeline(transaction=False)
        pipe.llen("some-list")
        PendingJobs.count_in(pipe)
        pipe.llen("other-list")
        assert await pipe.execute() == [0, 2, 0]


async def test_sync_marks_are_the_same_set() -> None:
    async with empty_redis_db(URL) as client:
        sync = SyncRedis.from_url(URL)
        try:
            marks = SyncPendingJobs(sync)
            marks.mark(["a", "b"], 7.0)
            marks.mark([], 8.0)
            assert marks.contains("a") and not marks.contains("x")
            assert marks.count() == 2
        finally:
            sync.close()
        assert await PendingJobs(client).marked_at(["a", "b"]) == [7.0, 7.0]


async def _received(ids: AsyncIterator[str], count: int) -> list[str]:
    got: list[str] = []
    async for job_id in ids:
        got.append(job_id)
        if len(got) == count:
            break
    return got


async def test_channels_carry_job_ids_each_on_its_own() -> None:
    # Pub/sub is server-wide: other processes may be subscribed to the same channels, so
    # this client's connections are told apart by their name.
    name = f"owners-test-{secrets.token_hex(4)}"
    async with empty_redis_db(URL) as client:
        named = Redis.from_url(URL, client_name=name)
        try:
            cancels, wakes = CancelChannel(named), BatchWakeChannel(named)
            async with cancels.subscribe() as cancelled, wakes.subscribe() as woken:
                assert await _subscribed_connections(client, name) == 2
                await cancels.publish("job-1")
                await wakes.publish("job-2")
                await client.publish(CANCEL_CHANNEL, "job-3")  # as an older release does
                got_cancels = await asyncio.wait_for(_received(cancelled, 2), 10)
                got_wakes = await asyncio.wait_for(_received(woken, 1), 10)
            assert got_cancels == ["job-1", "job-3"]
            assert got_wakes == ["job-2"]
            # Closed: no subscription is left behind (the server sees a closed connection
            # a moment after the client closes it).
            for _ in range(50):
                if await _subscribed_connections(client, name) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await _subscribed_connections(client, name) == 0
        finally:
            await named.aclose()


async def _subscribed_connections(client: Redis, name: str) -> int:
    return sum(1 for c in await client.client_list() if c["name"] == name and int(c["sub"]) > 0)


async def test_reconciler_turn_goes_to_one_process_until_it_expires() -> None:
    async with empty_redis_db(URL) as client:
        assert await take_turn(client, RECONCILER_LOCK, 5000)
        assert not await take_turn(client, RECONCILER_LOCK, 5000)
        assert 0 < await client.pttl(RECONCILER_LOCK) <= 5000
        await client.pexpire(RECONCILER_LOCK, 1)
        await asyncio.sleep(0.05)
        assert await take_turn(client, RECONCILER_LOCK, 5000)


async def test_batch_supervisor_lock_is_held_by_one_until_released() -> None:
    async with empty_redis_db(URL) as client:
        mine = batch_supervisor_lock(client, timeout=5.0)
        theirs = batch_supervisor_lock(client, timeout=5.0)
        assert await mine.acquire()
        assert not await theirs.acquire()  # does not wait
        assert 0 < await client.pttl(BATCH_SUPERVISOR_LOCK) <= 5000
        await mine.release()
        assert await theirs.acquire()
