"""The reconciler finds a job that lost its Celery message behind any backlog of jobs whose
messages are still queued (api/jobs/reconciler.py), on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from api.core.db import Database
from api.jobs.enqueue import JobQueue, QueuedJob, create_producer
from api.jobs.reconciler import Reconciler
from storage import job_metrics
from storage.db import create_db_engine, create_session_factory
from storage.job_metrics import JOBS_OPEN
from storage.keys import METRICS_RESYNC_LOCK, PENDING_JOBS, queue_name
from storage.models import Job, JobStatus, utcnow
from storage.repositories import api_keys, jobs
from storage.settings import StorageSettings
from tests.conftest import REDIS_BASE, new_database
from tests.helpers import sent_job_ids

pytestmark = pytest.mark.timeout(120)
REDIS_URL = f"{REDIS_BASE}/7"  # shared with test_enqueue.py; each empties it
MODEL = "m-reconciler"
QUEUE = queue_name(MODEL, "interactive")
BACKLOG = 600


@dataclass
class Backlog:
    db: Database
    queue: JobQueue
    broker: redis.Redis
    client: AsyncRedis  # the reconciler's
    queued: list[str]  # their messages wait on the queue, marked long ago
    lost: str  # queued as long ago, its message gone (and its mark)
    held: str  # an interactive job the dispatcher has not released: not the reconciler's


@pytest.fixture
def database() -> Iterator[str]:
    """A database of the test's own: every stranded job in it is the test's."""
    with new_database("ferry_test_reconciler") as url:
        yield url


@pytest.fixture
async def backlog(database: str) -> AsyncIterator[Backlog]:
    broker = redis.Redis.from_url(REDIS_URL)
    broker.flushdb()
    engine = create_db_engine(StorageSettings(database_url=database))
    db = Database(create_session_factory(engine))
    queue = JobQueue(create_producer(REDIS_URL), REDIS_URL)
    queue.start()
    # Ids sort in submission order; the lost job is the newest, behind the whole backlog.
    prefix = f"job_{secrets.token_hex(4)}"
    ids = [f"{prefix}{i:06d}" for i in range(BACKLOG + 2)]
    queued, lost, held = ids[:BACKLOG], ids[BACKLOG], ids[BACKLOG + 1]
    long_ago = utcnow() - timedelta(hours=1)
    async with db.transaction() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(6)}"])
        await jobs.insert_jobs(
            session,
            [
                Job(
                    id=job_id,
                    owner_id=key.id,
                    model=MODEL,
                    kind="chat",
                    lane="interactive",
                    status=JobStatus.QUEUED,
                    priority=0,
                    request={"messages": [], "max_tokens": 4},
                    attempts=0,
                    created_at=long_ago,
                    enqueued_at=None if job_id == held else long_ago,
                )
                for job_id in ids
            ],
        )
    await queue.send_now([QueuedJob(job_id, MODEL, "interactive", 0) for job_id in queued])
    broker.zadd(PENDING_JOBS, dict.fromkeys(queued, long_ago.timestamp()))
    client = AsyncRedis.from_url(REDIS_URL)
    try:
        yield Backlog(db, queue, broker, client, queued, lost, held)
    finally:
        await client.aclose()
        await queue.stop()
        await engine.dispose()
        broker.flushdb()
        broker.close()


def _reconciler(backlog: Backlog, interval_seconds: float) -> Reconciler:
    return Reconciler(
        backlog.db,
        backlog.client,
        backlog.queue,
        interval_seconds=interval_seconds,
        grace_seconds=30,
        settle_seconds=0.1,
    )


async def _enqueued_at(backlog: Backlog, job_id: str) -> object:
    async with backlog.db.read() as session:
        job = await jobs.get_job(session, job_id)
    assert job is not None
    return job.enqueued_at


async def test_a_lost_message_is_sent_again_behind_a_backlog_of_queued_ones(
    backlog: Backlog,
) -> None:
    before = time.time()
    assert await _reconciler(backlog, interval_seconds=10).reconcile_once() == 1
    sent = sent_job_ids(backlog.broker, QUEUE)
    # The lost job once more, after the backlog's own messages; none of those twice, and
    # not the held job (the dispatcher releases it).
    assert sorted(sent) == sorted([*backlog.queued, backlog.lost])
    mark = backlog.broker.zscore(PENDING_JOBS, backlog.lost)
    assert mark is not None and mark >= before
    enqueued_at = await _enqueued_at(backlog, backlog.lost)
    assert enqueued_at is not None and enqueued_at.timestamp() >= before  # type: ignore[attr-defined]
    assert await _enqueued_at(backlog, backlog.held) is None


async def test_a_pass_out_of_time_goes_on_where_it_stopped(backlog: Backlog) -> None:
    # No time at all: each pass reads one page, the next takes the following one.
    reconciler = _reconciler(backlog, interval_seconds=0)
    assert await reconciler.reconcile_once() == 0  # the first page: all on their way
    assert await reconciler.reconcile_once() == 1
    assert sorted(sent_job_ids(backlog.broker, QUEUE)) == sorted([*backlog.queued, backlog.lost])


# -- /metrics' open-job counts, corrected from SQL ---------------------------------------


async def test_open_job_counts_that_drifted_are_corrected_from_sql(backlog: Backlog) -> None:
    """Counts Redis lost or a dead process left off: set to what SQL counts (the backlog's
    jobs are all open), a model with none open back to 0; correct counts are left alone."""
    total = BACKLOG + 2
    backlog.broker.hset(JOBS_OPEN, mapping={MODEL: 5, "m-gone": 7})
    reconciler = _reconciler(backlog, interval_seconds=10)
    assert await reconciler.resync_open_counts() == {MODEL: total - 5, "m-gone": -7}
    assert await job_metrics.read_jobs_open(backlog.client) == {MODEL: total, "m-gone": 0}
    assert await reconciler.resync_open_counts() == {}


async def test_a_count_that_moves_while_sql_counts_is_left_for_the_next_pass(
    backlog: Backlog,
) -> None:
    """A job counted in Redis around SQL's count may or may not be in it: only the models
    whose count held still are corrected; a correction keeps what was counted after it."""
    backlog.broker.hset(JOBS_OPEN, mapping={MODEL: 10, "m-still": 2})
    before = await job_metrics.read_jobs_open(backlog.client)
    backlog.broker.hincrby(JOBS_OPEN, MODEL, 1)  # a job accepted while SQL counted
    after = await job_metrics.read_jobs_open(backlog.client)
    counted = {MODEL: 11, "m-still": 4}
    assert await job_metrics.correct_jobs_open(backlog.client, counted, before, after) == {
        "m-still": 2
    }
    assert await job_metrics.read_jobs_open(backlog.client) == {MODEL: 11, "m-still": 4}

    backlog.broker.hset(JOBS_OPEN, "m-still", 9)
    before = after = await job_metrics.read_jobs_open(backlog.client)
    backlog.broker.hincrby(JOBS_OPEN, "m-still", 3)  # after the second read
    assert await job_metrics.correct_jobs_open(backlog.client, counted, before, after) == {
        "m-still": -5
    }
    assert (await job_metrics.read_jobs_open(backlog.client))["m-still"] == 7


async def test_the_running_reconciler_corrects_the_counts_once_per_period(
    backlog: Backlog,
) -> None:
    backlog.broker.hset(JOBS_OPEN, MODEL, 1)
    reconciler = Reconciler(
        backlog.db,
        backlog.client,
        backlog.queue,
        interval_seconds=0.1,
        grace_seconds=30,
        metrics_resync_seconds=60,
        settle_seconds=0.1,
    )
    reconciler.start()
    try:
        deadline = time.monotonic() + 30
        while (await job_metrics.read_jobs_open(backlog.client)).get(MODEL) != BACKLOG + 2:
            assert time.monotonic() < deadline, "not corrected"
            await asyncio.sleep(0.1)
        # Its turn lasts the period: a count that drifts again waits for the next one.
        backlog.broker.hset(JOBS_OPEN, MODEL, 1)
        await asyncio.sleep(1)
        assert (await job_metrics.read_jobs_open(backlog.client))[MODEL] == 1
        assert 0 < backlog.broker.pttl(METRICS_RESYNC_LOCK) <= 60_000
    finally:
        await reconciler.stop()
