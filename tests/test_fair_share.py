"""Fair share across keys (api/jobs/dispatch.py): interactive jobs are held in SQL and
released a window at a time in weighted round-robin over keys, on real PostgreSQL and Redis
(rows inserted directly, a worker's heartbeat announced in the real registry); and one run
through the API with a real worker."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, func, select, update

from api.core.db import Database
from api.core.limits import KeyLimits
from api.jobs.dispatch import Dispatcher
from api.jobs.enqueue import JobQueue, create_producer
from storage.broker import priority_lists
from storage.db import create_db_engine, create_session_factory
from storage.keys import Lane, queue_name
from storage.migrate import upgrade
from storage.models import ApiKey, Job, JobStatus, utcnow
from storage.registry import ModelRegistry, ServedModel, WorkerBeat
from storage.repositories import jobs as jobs_repo
from storage.settings import StorageSettings
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, TINY, Stack, new_database
from tests.helpers import chat_body, submit, wait_job

pytestmark = pytest.mark.timeout(300)
REDIS_URL = f"{REDIS_BASE}/14"
SLOTS = 4  # the announced worker's engine slots: with factor 1, the model's window


@pytest.fixture(scope="module")
def fair_db() -> Iterator[str]:
    with new_database("ferry_test_fair") as url:
        yield url


@dataclass
class Env:
    db: Database
    redis: Redis
    registry: ModelRegistry
    queue: JobQueue
    model: str

    def dispatcher(self, db: Database | None = None, **defaults: Any) -> Dispatcher:
        return Dispatcher(
            db or self.db,
            self.registry,
            self.queue,
            self.redis,
            defaults=KeyLimits(**{"weight": 1, **defaults}),
            window_factor=1.0,
            interval_seconds=1.0,
        )

    async def announce(self, slots: int = SLOTS) -> None:
        beat = WorkerBeat("w-" + self.model, self.model, "vllm", 0, time.time(), concurrency=slots)
        await self.registry.heartbeat(beat, ServedModel(self.model, 2048, "vllm"), 60)

    async def key(self, **limits: Any) -> str:
        key_id = "key_" + secrets.token_hex(6)
        async with self.db.transaction() as session:
            session.add(ApiKey(id=key_id, key_hash=secrets.token_hex(32), limits=limits or None))
        return key_id

    async def hold(self, owner: str, n: int, priority: int = 0) -> list[str]:
        """`n` interactive jobs accepted and held, as the intake commits them."""
        rows = [
            Job(
                id=jobs_repo.new_job_id(),
                owner_id=owner,
                model=self.model,
                kind="chat",
                lane=Lane.INTERACTIVE,
                status=JobStatus.QUEUED,
                priority=priority,
                request={"messages": [], "max_tokens": 4},
                attempts=0,
            )
            for _ in range(n)
        ]
        async with self.db.transaction() as session:
            await jobs_repo.insert_jobs(session, rows)
        return sorted(r.id for r in rows)  # oldest first (one millisecond's: by random part)

    async def released(self) -> dict[str, list[str]]:
        """Released jobs' ids per key, oldest first."""
        async with self.db.read() as session:
            rows = await session.execute(
                select(Job.owner_id, Job.id)
                .where(Job.model == self.model, Job.enqueued_at.is_not(None))
                .order_by(Job.id)
            )
            out: dict[str, list[str]] = {}
            for owner, job_id in rows.all():
                out.setdefault(owner, []).append(job_id)
            return out

    async def finish(self, job_ids: list[str]) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                update(Job).where(Job.id.in_(job_ids)).values(status=JobStatus.SUCCEEDED)
            )

    async def messages(self) -> int:
        """Job ids in the model's interactive Celery queue (all priorities)."""
        total = 0
        for name in priority_lists(queue_name(self.model, Lane.INTERACTIVE)):
            for raw in await self.redis.lrange(name, 0, -1):  # type: ignore[misc]
                body = json.loads(raw)
                args = json.loads(base64.b64decode(body["body"]))[0]
                total += len(args[0])
        return total


@pytest.fixture(params=["postgresql", "sqlite"])
async def env(
    request: pytest.FixtureRequest, fair_db: str, redis_client: Redis, tmp_path: Path
) -> AsyncIterator[Env]:
    """PostgreSQL, and SQLite (`ferry serve`'s embedded database: one process)."""
    url = fair_db
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'ferry.db'}"
        await asyncio.to_thread(upgrade, url)
    engine = create_db_engine(StorageSettings(database_url=url))
    queue = JobQueue(create_producer(REDIS_URL), REDIS_URL)
    queue.start()
    try:
        e = Env(
            Database(create_session_factory(engine)),
            redis_client,
            ModelRegistry(redis_client),
            queue,
            "fair-" + secrets.token_hex(3),
        )
        # Each test sees only its own jobs (a model of an earlier test has no worker now,
        # so its held jobs would take a default window in the counts).
        async with e.db.transaction() as session:
            await session.execute(delete(Job))
        await e.announce()
        yield e
    finally:
        await queue.stop()
        await engine.dispose()


async def settle(env: Env, expected: int) -> None:
    """Wait until the queue thread has sent `expected` job ids to Redis."""
    for _ in range(100):
        if await env.messages() >= expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{await env.messages()} of {expected} job ids reached the queue")


async def test_a_lone_job_of_another_key_goes_out_in_the_first_round(env: Env) -> None:
    a, b = await env.key(), await env.key()
    await env.hold(a, 100)
    (b_job,) = await env.hold(b, 1)
    assert await env.dispatcher().dispatch_once() == SLOTS
    released = await env.released()
    assert released[b] == [b_job]
    assert len(released[a]) == SLOTS - 1
    await settle(env, SLOTS)
    # The window is full: nothing more goes out until a released job ends.
    assert await env.dispatcher().dispatch_once() == 0
    await env.finish(released[a][:2])
    assert await env.dispatcher().dispatch_once() == 2


async def test_a_newcomer_goes_out_over_a_window_another_key_filled(env: Env) -> None:
    a, b = await env.key(), await env.key()
    await env.hold(a, 100)
    dispatcher = env.dispatcher()
    assert await dispatcher.dispatch_once() == SLOTS
    # B arrives with A's jobs filling the window: B's first jobs go out at once, up to its
    # half of the window, without waiting for A's to end; A gets no more.
    b_jobs = await env.hold(b, 5)
    assert await dispatcher.dispatch_once() == SLOTS // 2
    released = await env.released()
    assert released[b] == b_jobs[: SLOTS // 2] and len(released[a]) == SLOTS
    # Out now: A 4, B 2. As A's jobs end, the window is full until A is down to its half.
    await env.finish(released[a][:2])
    assert await dispatcher.dispatch_once() == 0
    await env.finish(released[a][2:])
    assert await dispatcher.dispatch_once() == 2  # A 0 out, B 2: both refills are A's
    after = await env.released()
    assert len(after[b]) == SLOTS // 2 and len(after[a]) == SLOTS + 2


async def test_weights_share_the_window(env: Env) -> None:
    await env.announce(slots=30)
    heavy, light = await env.key(weight=2), await env.key()
    await env.hold(light, 100)
    await env.hold(heavy, 100)
    assert await env.dispatcher().dispatch_once() == 30
    released = await env.released()
    assert (len(released[heavy]), len(released[light])) == (20, 10)
    # As jobs end, the refill keeps the 2:1 share of what is out.
    await env.finish(released[heavy][:12] + released[light][:3])
    assert await env.dispatcher().dispatch_once() == 15
    after = await env.released()
    out_heavy = len(after[heavy]) - 12
    out_light = len(after[light]) - 3
    assert (out_heavy, out_light) == (20, 10)


async def test_max_concurrent_jobs_holds_the_rest(env: Env) -> None:
    await env.announce(slots=10)
    capped, other = await env.key(max_concurrent_jobs=3), await env.key()
    await env.hold(capped, 50)
    await env.hold(other, 2)
    assert await env.dispatcher().dispatch_once() == 5
    released = await env.released()
    assert len(released[capped]) == 3 and len(released[other]) == 2
    # Room in the window is no reason to go over the key's own limit...
    assert await env.dispatcher().dispatch_once() == 0
    # ...and one of its jobs ending lets exactly one more out.
    await env.finish(released[capped][:1])
    assert await env.dispatcher().dispatch_once() == 1
    assert len((await env.released())[capped]) == 4


async def test_deployment_default_max_concurrent_jobs_and_key_override(env: Env) -> None:
    await env.announce(slots=20)
    default, own = await env.key(), await env.key(max_concurrent_jobs=5)
    await env.hold(default, 20)
    await env.hold(own, 20)
    assert await env.dispatcher(max_concurrent_jobs=2).dispatch_once() == 7
    released = await env.released()
    assert len(released[default]) == 2 and len(released[own]) == 5


async def test_priority_orders_a_keys_own_jobs(env: Env) -> None:
    await env.announce(slots=3)
    a = await env.key()
    late = await env.hold(a, 2, priority=9)
    normal = await env.hold(a, 2, priority=5)
    urgent = await env.hold(a, 2, priority=0)
    assert await env.dispatcher().dispatch_once() == 3
    # (ids made in one millisecond are ordered by their random part: min is the oldest)
    assert set((await env.released())[a]) == {*urgent, min(normal)}
    await env.finish(urgent)
    assert await env.dispatcher().dispatch_once() == 2
    assert set((await env.released())[a]) - set(urgent + normal) == {min(late)}


async def test_held_jobs_survive_a_redis_flush(env: Env) -> None:
    a = await env.key()
    held = await env.hold(a, 10)
    assert await env.dispatcher().dispatch_once() == SLOTS
    await settle(env, SLOTS)
    await env.redis.flushdb()  # messages, pending marks and the registry: all gone
    async with env.db.read() as session:
        stranded = await jobs_repo.find_stranded_jobs(
            session,
            queued_before=utcnow() + timedelta(hours=1),
            lease_expired_before=utcnow(),
            limit=100,
        )
    # The reconciler re-sends only released jobs whose message was lost, never held ones.
    assert {j.id for j in stranded if j.id in held} == set(held[:SLOTS])
    # The worker announces itself again and ends the jobs it had; the rest go out.
    await env.announce()
    await env.finish(held[:SLOTS])
    dispatcher = env.dispatcher()
    assert await dispatcher.dispatch_once() == SLOTS
    await settle(env, SLOTS)
    await env.finish(held[SLOTS : 2 * SLOTS])
    assert await dispatcher.dispatch_once() == 2
    assert len((await env.released())[a]) == 10


async def test_two_dispatchers_never_overfill_the_window(env: Env, fair_db: str) -> None:
    """Two dispatchers, each with its own connection pool as two API processes have, pass
    at once again and again: together they release exactly the window."""
    if env.db.sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("SQLite is one embedded process: one dispatcher")
    await env.announce(slots=16)
    keys = [await env.key() for _ in range(3)]
    for key in keys:
        await env.hold(key, 40)
    other = create_db_engine(StorageSettings(database_url=fair_db))
    try:
        first = env.dispatcher()
        second = env.dispatcher(db=Database(create_session_factory(other)))
        counts = await asyncio.gather(
            *(d.dispatch_once() for _ in range(10) for d in (first, second))
        )
    finally:
        await other.dispose()
    assert sum(counts) == 16
    released = await env.released()
    assert sorted(len(released[k]) for k in keys) == [5, 5, 6]
    async with env.db.read() as session:
        out = await session.scalar(
            select(func.count()).where(Job.model == env.model, Job.enqueued_at.is_not(None))
        )
    assert out == 16


async def test_a_submit_wakes_the_dispatcher_at_once(env: Env) -> None:
    """The running dispatcher releases a job woken by its submit, without waiting for its
    timed pass."""
    dispatcher = Dispatcher(
        env.db,
        env.registry,
        env.queue,
        env.redis,
        defaults=KeyLimits(weight=1),
        window_factor=1.0,
        interval_seconds=30.0,  # its timer would never fire within this test
    )
    dispatcher.start()
    try:
        await asyncio.sleep(0.2)  # the first timed wait has begun
        a = await env.key()
        (job,) = await env.hold(a, 1)
        started = time.monotonic()
        dispatcher.wake()
        await settle(env, 1)
        assert time.monotonic() - started < 1.0
        assert (await env.released())[a] == [job]
    finally:
        await dispatcher.stop()


def test_jobs_through_the_api_all_complete_fairly(stack: Stack) -> None:
    """Jobs of two keys submitted through the API all run to the end, each released once
    by the dispatcher (marked in SQL) and run once."""
    with stack.client(KEY_A) as a, stack.client(KEY_B) as b:
        a_jobs = [submit(a, chat_body(TINY, f"a {i}", max_tokens=4)) for i in range(24)]
        b_jobs = [submit(b, chat_body(TINY, f"b {i}", max_tokens=4)) for i in range(3)]
        finals = [wait_job(a, j["id"]) for j in a_jobs] + [wait_job(b, j["id"]) for j in b_jobs]
    assert all(f["status"] == "succeeded" and f["attempts"] == 1 for f in finals), finals
    url = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND enqueued_at IS NOT NULL",
            ([f["id"] for f in finals],),
        ).fetchone()
    assert rows is not None and rows[0] == len(finals)
