"""Repositories and event streams on real PostgreSQL, SQLite (file) and Redis."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from storage.db import create_db_engine
from storage.events import (
    NO_EVENT,
    EventId,
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
from tests.conftest import REDIS_BASE, Sessions
from tests.helpers import empty_redis_db

pytestmark = pytest.mark.timeout(120)



async def _job(sessions: Sessions) -> Job:
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
        job = Job(id=jobs.new_job_id(), owner_id=key.id, model="m", kind="chat",
                  lane="interactive", status=JobStatus.QUEUED, priority=0,
                  request={"messages": [], "max_tokens": 4}, attempts=0)
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
    async with sessions.begin() as session:
        await jobs.claim_job(session, running.id, "w1", lease_seconds=0.01)
        await jobs.claim_job(session, fresh.id, "w1", lease_seconds=60)
    await asyncio.sleep(0.05)
    async with sessions() as session:
        found = await jobs.find_stranded_jobs(
            session, queued_before=utcnow() + timedelta(seconds=1),
            lease_expired_before=utcnow(), limit=1000)
    ids = {j.id for j in found}
    assert queued.id in ids and running.id in ids and fresh.id not in ids


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
        ("2-1", EventType.RETRY), ("2-2", EventType.DELTA), ("2-3", EventType.DELTA),
        ("2-4", EventType.USAGE), ("2-5", EventType.DONE)]
    assert events[3].data == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


async def test_tool_calls_are_stored_and_replayed_with_the_end(sessions: Sessions) -> None:
    """A reply that called tools keeps the calls and the content left without them; its
    `done` event, rebuilt from SQL, carries them as the worker sent them."""
    job = await _job(sessions)
    calls = [{"id": "c1", "type": "function",
              "function": {"name": "f", "arguments": '{"x": 1}'}}]
    async with sessions.begin() as session:
        await jobs.claim_job(session, job.id, "w1", lease_seconds=30)
        outcome = jobs.JobOutcome(JobStatus.SUCCEEDED, ["Ok <tool_call>", "..."], "tool_calls",
                                  5, 2, None, tool_calls=calls, result_content="Ok ")
        await jobs.finish_job(session, job.id, "w1", outcome)
        row = await jobs.get_job(session, job.id)
    assert row is not None
    assert (row.tool_calls, row.result_content, row.result_text) == (
        calls, "Ok ", "Ok <tool_call>...")
    assert events_from_job(row)[-1].data == done_data("tool_calls", calls, "Ok ") == {
        "finish_reason": "tool_calls", "tool_calls": calls, "content": "Ok "}


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    async with empty_redis_db(f"{REDIS_BASE}/14") as client:
        yield client


async def test_event_stream_appends_publishes_and_replays(redis_client: Redis) -> None:
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("ferry:job:j1:live")
    batch = [("j1", JobEvent(f"1-{i}", EventType.DELTA, {"text": str(i)})) for i in range(1, 4)]
    batch.append(("j1", JobEvent("1-4", EventType.DONE, {"finish_reason": "stop"})))
    await stream.publish(batch)
    assert [str(e.id) for e in await stream.read_after("j1", NO_EVENT) or []] == [
        "1-1", "1-2", "1-3", "1-4"]
    assert [e.id for e in await stream.read_after("j1", EventId(1, 2)) or []] == [
        EventId(1, 3), EventId(1, 4)]
    assert await stream.read_after("nope", NO_EVENT) is None
    assert 0 < await redis_client.ttl("ferry:job:j1:events") <= 60  # terminal event sets TTL
    live = []
    while len(live) < 4:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message:
            live.append(str(JobEvent.from_json(message["data"]).id))
    assert live == ["1-1", "1-2", "1-3", "1-4"]
    await pubsub.aclose()


async def test_one_publish_carries_many_jobs_events_and_any_text(redis_client: Redis) -> None:
    """Events of several jobs in one call each reach their own stream and channel, with
    their data intact whatever the text holds; a repeated id is refused by the stream (the
    replay stays as it was) and still published."""
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("ferry:job:a:live", "ferry:job:b:live")
    texts = ['say "hi"\n', "\u00e9t\u00e9 \U0001f600 \\ end", "}{", "<think>"]
    batch = [(job, JobEvent.delta(f"1-{i}", text, 1.5))
             for i, text in enumerate(texts, 1) for job in ("a", "b")]
    batch.append(("a", JobEvent("1-5", EventType.DONE, {"finish_reason": "length"})))
    await stream.publish(batch)
    await stream.publish([("b", JobEvent("1-2", EventType.DELTA, {"text": "again"}))])
    live: dict[str, list[JobEvent]] = {"a": [], "b": []}
    while sum(map(len, live.values())) < len(batch) + 1:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message:
            live[message["channel"].decode().split(":")[2]].append(
                JobEvent.from_json(message["data"]))
    for job in ("a", "b"):
        stored = await stream.read_after(job, NO_EVENT) or []
        assert [e.data["text"] for e in stored if e.type == EventType.DELTA] == texts
        assert all(e.data["ts"] == 1.5 for e in stored if e.type == EventType.DELTA)
    assert [e.data.get("text") for e in live["a"]] == [*texts, None]
    assert live["a"][-1] == JobEvent("1-5", EventType.DONE, {"finish_reason": "length"})
    assert [str(e.id) for e in live["b"]] == ["1-1", "1-2", "1-3", "1-4", "1-2"]
    assert 0 < await redis_client.ttl("ferry:job:a:events") <= 60
    assert await redis_client.ttl("ferry:job:b:events") == -1  # no terminal event yet
    await pubsub.aclose()


@pytest.mark.parametrize("event", [
    JobEvent("1-1", EventType.DELTA, {"text": 'a "quoted", "data": } text\n', "ts": 1.25}),
    JobEvent("2-17", EventType.USAGE, {"prompt_tokens": 3, "completion_tokens": 4,
                                       "total_tokens": 7}),
    JobEvent("1-9", EventType.DONE, {"finish_reason": None}),
    JobEvent("0-1", EventType.CANCELLED, {}),
])
def test_an_event_survives_the_wire_with_its_data_as_sent(event: JobEvent) -> None:
    """What is published (to_json, the publish script's shape) comes back equal, with the
    data's JSON text as json.dumps writes it (what SSE clients get)."""
    wire = event.to_json()
    back = JobEvent.from_json(wire.encode())
    assert back == event and back.id == event.id
    assert back.data_json == json.dumps(event.data)
    assert wire == json.dumps({"id": str(event.id), "type": event.type.value,
                               "data": event.data})


@pytest.mark.parametrize("text", ["", 'say "hi"\n\t\\', "\u00e9t\u00e9 \u4e16\u754c \U0001f600",
                                  "\x00\x1f\x7f", "\ud800 lone surrogate", "</script>"])
@pytest.mark.parametrize("ts", [1764130000.123456, 0.1, 1e20, None])
def test_a_delta_events_json_is_what_json_dumps_writes(text: str, ts: float | None) -> None:
    """A delta's JSON is json.dumps's text for its data, whatever the text holds, so
    replays, SSE and stored events all agree."""
    event = JobEvent.delta("1-3", text, ts)
    assert event.data_json == json.dumps({"text": text, "ts": ts})
    assert JobEvent.from_json(event.to_json()).data == {"text": text, "ts": ts}


@pytest.mark.parametrize("text", ["1-1", "0-1", "2-17", "12-345"])
def test_an_event_id_reads_back_as_written(text: str) -> None:
    assert str(EventId.parse(text)) == text


@pytest.mark.parametrize("text", ["", "1", "1-", "-1", "1-2-3", "a-1", "1-b", " 1-2", "+1-2",
                                  "1_0-2", "\u00b2-1", "\u0661-1"])
def test_anything_else_is_not_an_event_id(text: str) -> None:
    with pytest.raises(ValueError):
        EventId.parse(text)


def test_event_ids_order_as_their_events_do() -> None:
    """Attempt first, then the sequence (numbers, not text: 1-10 after 1-9)."""
    ids = ["0-1", "1-1", "1-2", "1-9", "1-10", "2-1"]
    assert sorted(map(EventId.parse, reversed(ids))) == [EventId.parse(i) for i in ids]
    assert EventId.parse("0-1") > NO_EVENT and EventId(1, 9).next() == EventId(1, 10)


def test_an_event_in_another_json_shape_is_still_read() -> None:
    """JSON of the same event written another way (key order, spacing) is parsed in full;
    an unknown type is refused."""
    compact = '{"type":"delta","data":{"text":"x"},"id":"1-2"}'
    assert JobEvent.from_json(compact) == JobEvent("1-2", EventType.DELTA, {"text": "x"})
    with pytest.raises(ValueError):
        JobEvent.from_json('{"id": "1-2", "type": "nope", "data": {}}')


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
        batches = job_event_batches(EventSources(hub, stream, Database(sessions)), job.id, None,
                                    keepalive_seconds=30, max_seconds=60)
        first = asyncio.create_task(anext(batches))
        async with hub.subscribe(job.id) as witness:
            await stream.publish([(job.id, JobEvent("1-1", EventType.DELTA, {"text": "a"}))])
            assert [str(e.id) for e in await first or []] == ["1-1"]
            await witness.get()
            # Three more arrive while nobody reads; a repeat of 1-1 is dropped.
            later = [JobEvent("1-2", EventType.DELTA, {"text": "b"}),
                     JobEvent("1-1", EventType.DELTA, {"text": "a"}),
                     JobEvent("1-3", EventType.USAGE, {"completion_tokens": 2}),
                     JobEvent("1-4", EventType.DONE, {"finish_reason": "stop"})]
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
        batches = job_event_batches(EventSources(hub, stream, Database(sessions)), job.id, None,
                                    keepalive_seconds=1.0, max_seconds=60)
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
            ("1-16", EventType.ERROR, {"message": "worker lost", "code": "server_error"})]
        with pytest.raises(StopAsyncIteration):
            await anext(batches)
    finally:
        await hub.stop()


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_event_hub_reconnects_and_resubscribes_after_losing_redis(
    redis_client: Redis, protocol: int
) -> None:
    """Redis drops the hub's pub/sub connection (CLIENT KILL): the hub connects again,
    its subscriptions are renewed, and events published afterwards reach the subscriber.
    (The API's hub speaks RESP2; on RESP3 messages arrive as push notifications.)"""
    from api.streaming.event_hub import JobEventHub

    name = f"hub-reconnect-{secrets.token_hex(3)}"
    hub_redis = Redis.from_url(f"{REDIS_BASE}/14", protocol=protocol, client_name=name)
    hub = JobEventHub(hub_redis)
    await hub.start()
    stream = JobEventStream(redis_client, maxlen=1000, ttl_seconds=60)
    try:
        async with hub.subscribe("j-reconnect") as live:
            await stream.publish([("j-reconnect", JobEvent("1-1", EventType.DELTA, {"text": "a"}))])
            assert str((await asyncio.wait_for(live.get(), 5)).id) == "1-1"
            # Only this hub's connection (other deployments' hubs share the server).
            ids = [c["id"] for c in await redis_client.client_list(_type="pubsub")
                   if c.get("name") == name]
            assert len(ids) == 1
            await redis_client.client_kill_filter(_id=ids[0])

            async def delivered_after_reconnect() -> JobEvent:
                seq = 2
                while True:  # publish until the renewed subscription hears one
                    await stream.publish([("j-reconnect", JobEvent(
                        f"1-{seq}", EventType.DELTA, {"text": "b"}))])
                    try:
                        return await asyncio.wait_for(live.get(), 0.2)
                    except TimeoutError:
                        seq += 1

            event = await asyncio.wait_for(delivered_after_reconnect(), 15)
            assert event.data == {"text": "b"}
            assert await redis_client.pubsub_numsub("ferry:job:j-reconnect:live") == [
                (b"ferry:job:j-reconnect:live", 1)]
    finally:
        await hub.stop()
        await hub_redis.aclose()


async def test_any_open_batch_sees_open_batches_only(sessions: Sessions) -> None:
    """The batch supervisor's idle check: a batch counts until it reaches a final state."""
    from datetime import timedelta

    from storage.models import Batch, BatchStatus, utcnow
    from storage.repositories import batches

    async with sessions() as session:
        before = await batches.any_open(session)  # False unless another test left one
    job = await _job(sessions)  # for an API key
    batch = Batch(id=batches.new_batch_id(), owner_id=job.owner_id, endpoint="/v1/completions",
                  input_file_id="file-x", completion_window="24h",
                  expires_at=utcnow() + timedelta(hours=24))
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
        return Batch(id=batches.new_batch_id(), owner_id=job.owner_id,
                     endpoint="/v1/completions", input_file_id="file-x",
                     completion_window="24h", expires_at=utcnow() + timedelta(hours=24),
                     **values)

    batch = new_batch()
    async with sessions.begin() as session:
        await batches.add_batch(session, batch)
        assert await batches.request_cancel(session, batch.id)
    async with sessions() as session:
        row = await batches.get_batch(session, batch.id)
        assert row is not None
        assert type(row.status) is BatchStatus and row.status == BatchStatus.CANCELLING
        assert type(row.outcome) is BatchStatus and row.outcome == BatchStatus.CANCELLED
        stored = (await session.execute(text("SELECT status, outcome FROM batches WHERE id = :id"),
                                        {"id": batch.id})).one()
        assert tuple(stored) == ("cancelling", "cancelled")
    with pytest.raises(StatementError, match="'finished' is not a valid BatchStatus"):
        async with sessions.begin() as session:
            await batches.add_batch(session, new_batch(status="finished"))
