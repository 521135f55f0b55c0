"""Repositories on real PostgreSQL and SQLite (file), and the event hub's batches and
keepalives over Redis with SQL as the record."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from redis.asyncio import Redis

from storage.db import create_db_engine
from storage.events import (
    EventType,
    JobEvent,
    JobEventStream,
    done_data,
    events_from_job,
)
from storage.keys import job_channel
from storage.models import Job, JobStatus
from storage.repositories import api_keys, jobs
from storage.settings import StorageSettings
from tests.conftest import Sessions

pytestmark = pytest.mark.timeout(120)


async def _job(sessions: Sessions) -> Job:
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
        job = Job(
            id=jobs.new_job_id(),
            owner_id=key.id,
            model="m",
            kind="chat",
            lane="interactive",
            status=JobStatus.QUEUED,
            priority=0,
            request={"messages": [], "max_tokens": 4},
            attempts=0,
        )
        await jobs.insert_jobs(session, [job])
    return job


async def test_api_keys_store_only_a_hash(sessions: Sessions) -> None:
    token = f"sk-secret-{secrets.token_hex(8)}"
    async with sessions.begin() as session:
        (first,) = await api_keys.ensure_keys(session, [token])
        (again,) = await api_keys.ensure_keys(session, [token])
    assert first.id == again.id
    assert first.key_hash == api_keys.hash_key(token) and token not in first.key_hash
    async with sessions() as session:
        assert (await api_keys.find_key(session, token)) is not None
        assert (await api_keys.find_key(session, token + "x")) is None


async def test_keys_inserted_by_starters_at_once_are_stored_once(sessions: Sessions) -> None:
    """Two API processes starting on the same FERRY_API_KEYS (and with authentication off):
    the second inserts while the first's rows are not committed yet, and neither fails."""
    tokens = [f"sk-race-{secrets.token_hex(6)}" for _ in range(3)]
    async with sessions.begin() as first:
        mine = await api_keys.ensure_keys(first, tokens)
        await api_keys.ensure_builtin_owner(first)

        async def second_start() -> list[str]:
            async with sessions.begin() as second:
                rows = await api_keys.ensure_keys(second, [*reversed(tokens), tokens[0]])
                assert await api_keys.ensure_builtin_owner(second) == api_keys.BUILTIN_OWNER_ID
                return [row.id for row in rows]

        # It waits on the first transaction's rows; they are committed meanwhile.
        theirs = asyncio.create_task(second_start())
        await asyncio.sleep(0.5)
        assert not theirs.done()
    assert await theirs == [row.id for row in reversed(mine)]
    async with sessions() as session:
        for token, row in zip(tokens, mine, strict=True):
            found = await api_keys.find_key(session, token)
            assert found is not None and found.id == row.id and found.source == "env"
        owner = await api_keys.get_key(session, api_keys.BUILTIN_OWNER_ID)
        assert owner is not None and owner.source == "builtin"


async def test_only_env_keys_missing_from_the_list_in_force_are_revoked(
    sessions: Sessions,
) -> None:
    kept, dropped = f"sk-kept-{secrets.token_hex(6)}", f"sk-dropped-{secrets.token_hex(6)}"
    # Never committed: revoking every unlisted key of the session's database would revoke
    # the keys of the test stacks that share it.
    async with sessions() as session:
        await api_keys.ensure_keys(session, [kept, dropped])
        made, _ = await api_keys.create_admin_key(session, "made", None)
        made_id = made.id
        # Making keys revokes nothing; only the list in force at a start does.
        found = await api_keys.find_key(session, dropped)
        assert found is not None and found.revoked_at is None
        assert await api_keys.revoke_unlisted(session, [kept]) >= 1
        session.expire_all()
        kept_row = await api_keys.find_key(session, kept)
        dropped_row = await api_keys.find_key(session, dropped)
        made_row = await api_keys.get_key(session, made_id)
        assert kept_row is not None and kept_row.revoked_at is None
        assert dropped_row is not None and dropped_row.revoked_at is not None
        assert made_row is not None and made_row.revoked_at is None
        await session.rollback()


async def test_claim_is_exclusive_until_the_lease_expires(sessions: Sessions) -> None:
    job = await _job(sessions)
    async with sessions.begin() as session:
        claimed = await jobs.claim_job(session, job.id, "w1", lease_seconds=0.3)
    assert claimed is not None and claimed.attempts == 1 and claimed.worker_id == "w1"
    async with sessions.begin() as session:
        assert await jobs.claim_job(session, job.id, "w2", lease_seconds=30) is None
    await asyncio.sleep(0.4)
    async with sessions.begin() as session:
        taken = await jobs.claim_job(session, job.id, "w2", lease_seconds=30)
    assert taken is not None and taken.attempts == 2 and taken.worker_id == "w2"
    # The first worker's late result no longer lands.
    outcome = jobs.JobOutcome(JobStatus.SUCCEEDED, ["a"], "stop", 1, 1, None)
    async with sessions.begin() as session:
        assert not await jobs.finish_job(session, job.id, "w1", outcome)
        assert await jobs.finish_job(session, job.id, "w2", outcome)
    async with sessions.begin() as session:
        assert await jobs.claim_job(session, job.id, "w3", lease_seconds=30) is None


async def test_concurrent_claims_have_one_winner(sessions: Sessions) -> None:
    job = await _job(sessions)

    async def claim(worker: str) -> bool:
        async with sessions.begin() as session:
            return await jobs.claim_job(session, job.id, worker, lease_seconds=30) is not None

    wins = await asyncio.gather(*(claim(f"w{i}") for i in range(8)))
    assert sum(wins) == 1


async def test_cancel_transitions(sessions: Sessions) -> None:
    queued, running = await _job(sessions), await _job(sessions)
    async with sessions.begin() as session:
        await jobs.claim_job(session, running.id, "w1", lease_seconds=30)
    async with sessions.begin() as session:
        assert await jobs.cancel_job(session, queued.id) == JobStatus.QUEUED
        assert await jobs.cancel_job(session, running.id) == JobStatus.RUNNING
        assert await jobs.cancel_job(session, running.id) is None
        assert await jobs.claim_job(session, queued.id, "w1", lease_seconds=30) is None
    # The worker's partial output lands on the cancelled job; status stays cancelled.
    partial = jobs.JobOutcome(JobStatus.CANCELLED, ["x", "y"], "abort", 3, 2, None)
    async with sessions.begin() as session:
        found = await jobs.cancelled_among(session, [running.id, queued.id])
        assert set(found) == {running.id, queued.id}
        assert await jobs.finish_job(session, running.id, "w1", partial)
        row = await jobs.get_job(session, running.id)
    assert row is not None and row.status == JobStatus.CANCELLED and row.result_text == "xy"


async def test_stranded_jobs_are_old_queued_and_expired_leases(sessions: Sessions) -> None:
    from datetime import timedelta

    from storage.models import utcnow

    queued, running, fresh = await _job(sessions), await _job(sessions), await _job(sessions)
    held = await _job(sessions)  # never released by the dispatcher: not lost, waiting
    async with sessions.begin() as session:
        await jobs.mark_enqueued(session, [queued.id], utcnow())
        await jobs.claim_job(session, running.id, "w1", lease_seconds=0.01)
        await jobs.claim_job(session, fresh.id, "w1", lease_seconds=60)
    await asyncio.sleep(0.05)
    async with sessions() as session:
        found = await jobs.find_stranded_jobs(
            session,
            queued_before=utcnow() + timedelta(seconds=1),
            lease_expired_before=utcnow(),
            limit=1000,
        )
    ids = {j.id for j in found}
    assert queued.id in ids and running.id in ids and fresh.id not in ids
    assert held.id not in ids


async def test_events_rebuilt_from_sql_match_worker_numbering(sessions: Sessions) -> None:
    job = await _job(sessions)
    async with sessions.begin() as session:
        await jobs.claim_job(session, job.id, "w1", lease_seconds=0.01)
    await asyncio.sleep(0.05)
    async with sessions.begin() as session:
        await jobs.claim_job(session, job.id, "w2", lease_seconds=30)
        outcome = jobs.JobOutcome(JobStatus.SUCCEEDED, ["He", "llo"], "length", 5, 2, None)
        await jobs.finish_job(session, job.id, "w2", outcome)
        row = await jobs.get_job(session, job.id)
    assert row is not None
    events = events_from_job(row)
    assert [(str(e.id), e.type) for e in events] == [
        ("2-1", EventType.RETRY),
        ("2-2", EventType.DELTA),
        ("2-3", EventType.DELTA),
        ("2-4", EventType.USAGE),
        ("2-5", EventType.DONE),
    ]
    assert events[3].data == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


async def test_tool_calls_are_stored_and_replayed_with_the_end(sessions: Sessions) -> None:
    """A reply that called tools keeps the calls and the content left without them; its
    `done` event, rebuilt from SQL, carries them as the worker sent them."""
    job = await _job(sessions)
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    async with sessions.begin() as session:
        await jobs.claim_job(session, job.id, "w1", lease_seconds=30)
        outcome = jobs.JobOutcome(
            JobStatus.SUCCEEDED,
            ["Ok <tool_call>", "..."],
            "tool_calls",
            5,
            2,
            None,
            tool_calls=calls,
            result_content="Ok ",
        )
        await jobs.finish_job(session, job.id, "w1", outcome)
        row = await jobs.get_job(session, job.id)
    assert row is not None
    assert (row.tool_calls, row.result_content, row.result_text) == (
        calls,
        "Ok ",
        "Ok <tool_call>...",
    )
    assert (
        events_from_job(row)[-1].data
        == done_data("tool_calls", calls, "Ok ")
        == {"finish_reason": "tool_calls", "tool_calls": calls, "content": "Ok "}
    )


async def test_sqlite_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="file"):
        create_db_engine(StorageSettings(database_url="sqlite+aiosqlite:///:memory:"))


async def test_release_gives_a_running_job_back_to_the_queue(sessions: Sessions) -> None:
    job = await _job(sessions)
    async with sessions.begin() as session:
        await jobs.claim_job(session, job.id, "w1", lease_seconds=30)
        await jobs.release_job(session, job.id, "w2")  # not w2's job: no effect
        assert (await jobs.get_job(session, job.id)).status == JobStatus.RUNNING  # type: ignore[union-attr]
        await jobs.release_job(session, job.id, "w1")
    async with sessions.begin() as session:
        again = await jobs.claim_job(session, job.id, "w2", lease_seconds=30)
    assert again is not None and again.attempts == 2


async def test_events_that_arrive_together_come_out_as_one_batch(
    redis_client: Redis, sessions: Sessions
) -> None:
    """A subscriber that falls behind gets everything queued for it in one batch (one
    SSE write), in order, with no duplicates; one that keeps up gets each event alone."""
    from api.core.db import Database
    from api.streaming.event_hub import JobEventHub
    from api.streaming.job_events import EventSources, job_event_batches

    job = await _job(sessions)
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    hub = JobEventHub(redis_client)
    await hub.start()
    try:
        batches = job_event_batches(
            EventSources(hub, stream, Database(sessions)),
            job.id,
            None,
            keepalive_seconds=30,
            max_seconds=60,
        )
        first = asyncio.create_task(anext(batches))
        async with hub.subscribe(job.id) as witness:
            await stream.publish([(job.id, JobEvent("1-1", EventType.DELTA, {"text": "a"}))])
            assert [str(e.id) for e in await first or []] == ["1-1"]
            await witness.get()
            # Three more arrive while nobody reads; a repeat of 1-1 is dropped.
            later = [
                JobEvent("1-2", EventType.DELTA, {"text": "b"}),
                JobEvent("1-1", EventType.DELTA, {"text": "a"}),
                JobEvent("1-3", EventType.USAGE, {"completion_tokens": 2}),
                JobEvent("1-4", EventType.DONE, {"finish_reason": "stop"}),
            ]
            for event in later:
                await redis_client.publish(job_channel(job.id), event.to_json())
            for _ in later:  # the hub fans out to both queues in the same step
                await witness.get()
        assert [str(e.id) for e in await anext(batches) or []] == ["1-2", "1-3", "1-4"]
        with pytest.raises(StopAsyncIteration):  # it ended with the terminal event
            await anext(batches)
    finally:
        await hub.stop()


async def test_a_quiet_stream_gets_keepalives_and_ends_when_sql_says_the_job_ended(
    redis_client: Redis, sessions: Sessions
) -> None:
    """A keep-alive after each `keepalive_seconds` without events, none while events come
    more often than that; at a silence after the job ended in SQL with no terminal event
    published (its worker died), the stream closes with a terminal event from SQL."""
    from api.core.db import Database
    from api.streaming.event_hub import JobEventHub
    from api.streaming.job_events import KEEPALIVE, EventSources, job_event_batches

    job = await _job(sessions)
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    hub = JobEventHub(redis_client)
    await hub.start()
    loop = asyncio.get_running_loop()
    try:
        batches = job_event_batches(
            EventSources(hub, stream, Database(sessions)),
            job.id,
            None,
            keepalive_seconds=1.0,
            max_seconds=60,
        )
        started = loop.time()
        assert await anext(batches) is KEEPALIVE
        assert 1.0 <= loop.time() - started < 5
        assert await anext(batches) is KEEPALIVE  # and again after the next silence

        async def publish_every_tenth_of_a_second() -> None:
            for i in range(1, 16):
                await stream.publish([(job.id, JobEvent.delta(f"1-{i}", str(i), None))])
                await asyncio.sleep(0.1)

        publishing = asyncio.create_task(publish_every_tenth_of_a_second())
        seen: list[str] = []
        while len(seen) < 15:
            batch = await anext(batches)
            assert batch is not KEEPALIVE, f"a keep-alive while events flowed, after {seen}"
            seen += [str(e.id) for e in batch or []]
        await publishing
        assert seen == [f"1-{i}" for i in range(1, 16)]

        async with sessions.begin() as session:
            row = await session.get(Job, job.id)
            assert row is not None
            row.status, row.error = JobStatus.FAILED, "worker lost"
        ending = await anext(batches)
        assert ending is not KEEPALIVE and [(str(e.id), e.type, e.data) for e in ending or []] == [
            # A failure of unknown kind (no error_code) counts as a server error.
            ("1-16", EventType.ERROR, {"message": "worker lost", "code": "server_error"})
        ]
        with pytest.raises(StopAsyncIteration):
            await anext(batches)
    finally:
        await hub.stop()


async def test_any_open_batch_sees_open_batches_only(sessions: Sessions) -> None:
    """The batch supervisor's idle check: a batch counts until it reaches a final state."""
    from datetime import timedelta

    from storage.models import Batch, BatchStatus, utcnow
    from storage.repositories import batches

    async with sessions() as session:
        before = await batches.any_open(session)  # False unless another test left one
    job = await _job(sessions)  # for an API key
    batch = Batch(
        id=batches.new_batch_id(),
        owner_id=job.owner_id,
        endpoint="/v1/completions",
        input_file_id="file-x",
        completion_window="24h",
        expires_at=utcnow() + timedelta(hours=24),
    )
    async with sessions.begin() as session:
        await batches.add_batch(session, batch)
    for status in BatchStatus:
        async with sessions.begin() as session:
            row = await batches.get_batch(session, batch.id)
            assert row is not None
            row.status = status
        async with sessions() as session:
            assert await batches.any_open(session) == (before or not status.is_terminal)


async def test_batch_status_is_its_enum_in_python_and_its_value_in_sql(
    sessions: Sessions,
) -> None:
    """`Batch.status` and `outcome` read back as BatchStatus; the columns hold the plain
    value (they stay VARCHAR, as the migrations made them), and an unknown one is refused."""
    from datetime import timedelta

    from sqlalchemy import text
    from sqlalchemy.exc import StatementError

    from storage.models import Batch, BatchStatus, utcnow
    from storage.repositories import batches

    job = await _job(sessions)  # for an API key

    def new_batch(**values: object) -> Batch:
        return Batch(
            id=batches.new_batch_id(),
            owner_id=job.owner_id,
            endpoint="/v1/completions",
            input_file_id="file-x",
            completion_window="24h",
            expires_at=utcnow() + timedelta(hours=24),
            **values,
        )

    batch = new_batch()
    async with sessions.begin() as session:
        await batches.add_batch(session, batch)
        assert await batches.request_cancel(session, batch.id)
    async with sessions() as session:
        row = await batches.get_batch(session, batch.id)
        assert row is not None
        assert type(row.status) is BatchStatus and row.status == BatchStatus.CANCELLING
        assert type(row.outcome) is BatchStatus and row.outcome == BatchStatus.CANCELLED
        stored = (
            await session.execute(
                text("SELECT status, outcome FROM batches WHERE id = :id"), {"id": batch.id}
            )
        ).one()
        assert tuple(stored) == ("cancelling", "cancelled")
    with pytest.raises(StatementError, match="'finished' is not a valid BatchStatus"):
        async with sessions.begin() as session:
            await batches.add_batch(session, new_batch(status="finished"))
