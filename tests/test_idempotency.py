"""`Idempotency-Key` on the routes that create work (api/core/idempotency.py): the same key
and body replay the first answer (one object in SQL), another body is a 409 with nothing
stored, keys are per API key, racing replicas create exactly one job, expired keys start
afresh, a bad header is a 400 naming it; files and batches too; chat and completions replay
their jobs (in process, and end to end with a worker, streamed and not).

API-level tests run the app in process (tests/fixtures/api.py): jobs stay queued, which is
all a replay of a 202 needs."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.core.settings import ApiSettings
from storage.db import create_db_engine, create_session_factory
from storage.models import ApiKey, Batch, File, IdempotencyRecord, Job, utcnow
from storage.repositories import idempotency as records
from storage.repositories.api_keys import hash_key, new_key_id, new_token
from storage.settings import StorageSettings
from tests.batching import CHAT, chat_line, jsonl
from tests.conftest import KEY_A, KEY_B, TINY, Sessions, Stack
from tests.fixtures.api import InProcessApi, running_api
from tests.helpers import assert_error, chat_body

pytestmark = pytest.mark.timeout(180)

HEADER = "Idempotency-Key"


def new_key() -> str:
    return f"idem-{secrets.token_hex(8)}"


def job_body(content: str = "Hello there.") -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": 8}


@pytest.fixture
async def sql(in_process_api: InProcessApi) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_db_engine(StorageSettings(database_url=in_process_api.database_url))
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def count(sessions: async_sessionmaker[AsyncSession], model: Any, *where: Any) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model).where(*where)))


async def records_of(sessions: async_sessionmaker[AsyncSession], key: str) -> int:
    return await count(sessions, IdempotencyRecord, IdempotencyRecord.key == key)


async def test_same_key_and_body_replays_the_first_job(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    key = new_key()
    jobs_before = await count(sql, Job)
    async with in_process_api.client() as http:
        first = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        assert first.status_code == 202, first.text
        assert "Idempotent-Replayed" not in first.headers
        # The same request, serialised otherwise (key order, whitespace): the same body.
        reordered = json.dumps(dict(reversed(list(job_body().items()))), indent=2)
        for content in (json.dumps(job_body()), reordered):
            again = await http.post(
                "/v1/jobs",
                content=content,
                headers={HEADER: key, "Content-Type": "application/json"},
            )
            assert again.status_code == 202, again.text
            assert again.headers["Idempotent-Replayed"] == "true"
            assert again.json() == first.json()
        # Without the header every request is new.
        other = await http.post("/v1/jobs", json=job_body())
        assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert await count(sql, Job) == jobs_before + 2
    assert await count(sql, Job, Job.id == first.json()["id"]) == 1
    async with sql() as session:
        rows = (
            await session.scalars(select(IdempotencyRecord).where(IdempotencyRecord.key == key))
        ).all()
    assert [(r.object_id, r.response_status, r.route) for r in rows] == [
        (first.json()["id"], 202, "POST /v1/jobs")
    ]


async def test_another_body_or_route_is_a_409_and_nothing_is_stored(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    key = new_key()
    async with in_process_api.client() as http:
        first = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        assert first.status_code == 202, first.text
        jobs_before = await count(sql, Job)
        error = assert_error(
            await http.post("/v1/jobs", json=job_body("Something else."), headers={HEADER: key}),
            409,
            "idempotency_key_reused",
        )
        assert error["param"] == HEADER
        error = assert_error(
            await http.post(
                "/v1/completions",
                json={"model": TINY, "prompt": "Hello", "max_tokens": 4},
                headers={HEADER: key},
            ),
            409,
            "idempotency_key_reused",
        )
        assert "POST /v1/jobs" in error["message"]
        # The first answer is still the one replayed.
        again = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        assert again.json() == first.json()
    assert await count(sql, Job) == jobs_before
    assert await records_of(sql, key) == 1


async def test_keys_are_per_api_key(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    key = new_key()
    async with in_process_api.client() as a, in_process_api.client(KEY_B) as b:
        mine = await a.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        theirs = await b.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        # B's own key with another body is B's business, not a conflict with A's.
        theirs_other = await b.post("/v1/jobs", json=job_body("x"), headers={HEADER: key})
        assert mine.status_code == theirs.status_code == 202
        assert "Idempotent-Replayed" not in theirs.headers
        assert mine.json()["id"] != theirs.json()["id"]
        assert_error(theirs_other, 409, "idempotency_key_reused")
        # B cannot read A's job through a replay either: its replay is its own job.
        replay = await b.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        assert replay.json()["id"] == theirs.json()["id"]
    assert await records_of(sql, key) == 2


async def test_racing_requests_on_two_replicas_create_one_job(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    key = new_key()
    jobs_before = await count(sql, Job)
    async with (
        running_api(
            in_process_api.database_url, in_process_api.redis_url, in_process_api.object_dir
        ) as second,
        in_process_api.client() as one,
        second.client() as two,
    ):
        clients = [one, two] * 25
        answers = await asyncio.gather(
            *(c.post("/v1/jobs", json=job_body("race"), headers={HEADER: key}) for c in clients)
        )
    assert {a.status_code for a in answers} == {202}, [
        a.text for a in answers if a.status_code != 202
    ]
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 49
    assert await count(sql, Job) == jobs_before + 1


async def test_a_failed_request_frees_the_key(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    key = new_key()
    jobs_before = await count(sql, Job)
    async with in_process_api.client() as http:
        wrong = {**job_body(), "model": "no-such-model"}
        assert_error(await http.post("/v1/jobs", json=wrong, headers={HEADER: key}), 404)
        assert await records_of(sql, key) == 0
        # A body the route refuses before it runs: nothing claimed either.
        assert_error(
            await http.post("/v1/jobs", json={"messages": "nope"}, headers={HEADER: key}), 400
        )
        assert await records_of(sql, key) == 0
        fixed = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        assert fixed.status_code == 202, fixed.text
    assert await count(sql, Job) == jobs_before + 1
    assert await records_of(sql, key) == 1


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("k" * 256, "at most 255"),
        ("", "empty"),
        (b"caf\xe9", "printable"),
        (b"a\x7fb", "printable"),
    ],
)
async def test_bad_header_is_a_400_naming_it(
    in_process_api: InProcessApi,
    sql: async_sessionmaker[AsyncSession],
    value: str | bytes,
    says: str,
) -> None:
    jobs_before = await count(sql, Job)
    records_before = await count(sql, IdempotencyRecord)
    async with in_process_api.client() as http:
        for path, body in (("/v1/jobs", job_body()), (CHAT, job_body())):
            error = assert_error(
                await http.post(path, json=body, headers={HEADER: value}),
                400,
                "invalid_idempotency_key",
            )
            assert error["param"] == HEADER and says in error["message"]
        # 255 characters are fine.
        ok = await http.post("/v1/jobs", json=job_body(), headers={HEADER: "k" * 255})
        assert ok.status_code == 202, ok.text
    assert await count(sql, Job) == jobs_before + 1
    assert await count(sql, IdempotencyRecord) == records_before + 1
    async with sql() as session:
        await session.execute(
            IdempotencyRecord.__table__.delete().where(IdempotencyRecord.key == "k" * 255)
        )
        await session.commit()


async def test_an_expired_key_starts_afresh(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    key = new_key()
    settings = ApiSettings(api_keys=[KEY_A, KEY_B], idempotency_ttl_seconds=0.5)
    async with (
        running_api(
            in_process_api.database_url,
            in_process_api.redis_url,
            in_process_api.object_dir,
            settings,
        ) as short,
        short.client() as http,
    ):
        first = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        replay = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        assert replay.json()["id"] == first.json()["id"]
        await asyncio.sleep(0.7)
        # Expired: treated as absent, even with another body, and replaced.
        later = await http.post("/v1/jobs", json=job_body("later"), headers={HEADER: key})
        assert later.status_code == 202, later.text
        assert "Idempotent-Replayed" not in later.headers
        assert later.json()["id"] != first.json()["id"]
    async with sql() as session:
        rows = (
            await session.scalars(select(IdempotencyRecord).where(IdempotencyRecord.key == key))
        ).all()
    assert [r.object_id for r in rows] == [later.json()["id"]]


async def test_files_and_batches_replay_their_object(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    file_key, batch_key = new_key(), new_key()
    content = jsonl([chat_line("a"), chat_line("b")])
    async with in_process_api.client() as http:

        async def upload(data: bytes, filename: str = "in.jsonl") -> httpx.Response:
            return await http.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": (filename, data, "application/jsonl")},
                headers={HEADER: file_key},
            )

        files_before = await count(sql, File)
        first = await upload(content)
        assert first.status_code == 200, first.text
        again = await upload(content)  # a new multipart boundary, the same file
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.json() == first.json()
        assert_error(await upload(content + content), 409, "idempotency_key_reused")
        assert_error(await upload(content, "other.jsonl"), 409, "idempotency_key_reused")
        assert await count(sql, File) == files_before + 1

        file_id = first.json()["id"]
        body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
        batches_before = await count(sql, Batch)
        batch = await http.post("/v1/batches", json=body, headers={HEADER: batch_key})
        assert batch.status_code == 200, batch.text
        replay = await http.post("/v1/batches", json=body, headers={HEADER: batch_key})
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json() == batch.json()
        assert_error(
            await http.post(
                "/v1/batches",
                json={**body, "metadata": {"x": "y"}},
                headers={HEADER: batch_key},
            ),
            409,
            "idempotency_key_reused",
        )
        assert await count(sql, Batch) == batches_before + 1
        await http.post(f"/v1/batches/{batch.json()['id']}/cancel")


async def test_chat_and_completions_replay_their_jobs_in_process(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    """Without a worker a synchronous completion times out (503). With an Idempotency-Key
    its jobs go on (a retry is meant to find them); the retry is answered from those jobs,
    here once they have been cancelled, not from new ones."""
    settings = ApiSettings(api_keys=[KEY_A, KEY_B], sync_timeout_seconds=0.5)
    requests = [
        (CHAT, job_body("chat replay")),
        ("/v1/completions", {"model": TINY, "prompt": ["a", "b"], "max_tokens": 4}),
    ]
    async with (
        running_api(
            in_process_api.database_url,
            in_process_api.redis_url,
            in_process_api.object_dir,
            settings,
        ) as short,
        short.client() as http,
    ):
        for path, body in requests:
            key = new_key()
            jobs_before = await count(sql, Job)
            assert_error(await http.post(path, json=body, headers={HEADER: key}), 503)
            async with sql() as session:
                record = (
                    await session.scalars(
                        select(IdempotencyRecord).where(IdempotencyRecord.key == key)
                    )
                ).one()
            ids = record.response_body["job_ids"] if record.response_body else []
            assert len(ids) == len(body.get("prompt", [None]))
            assert await count(sql, Job) == jobs_before + len(ids)
            assert await count(sql, Job, Job.id.in_(ids), Job.status == "queued") == len(ids)
            # Still waiting: the retry times out the same way, on the same jobs.
            assert_error(await http.post(path, json=body, headers={HEADER: key}), 503)
            for job_id in ids:
                assert (await http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
            replay = await http.post(path, json=body, headers={HEADER: key})
            assert replay.status_code == 200, replay.text
            assert replay.headers["Idempotent-Replayed"] == "true"
            assert replay.headers["X-Ferry-Job-Id"].split(",") == ids
            assert {c["finish_reason"] for c in replay.json()["choices"]} == {"abort"}
            assert await count(sql, Job) == jobs_before + len(ids)
            # Without a key, a timed-out request's jobs are cancelled, as before.
            assert_error(await http.post(path, json=body), 503)
            async with sql() as session:
                newest = (
                    await session.scalars(select(Job).order_by(Job.id.desc()).limit(len(ids)))
                ).all()
            assert {j.status for j in newest} == {"cancelled"}


def test_chat_replays_the_same_completion_end_to_end(stack: Stack) -> None:
    """With a worker: a retried completion is the same completion (same id, same text);
    a stream whose client left keeps its job, and the retry streams that job's events from
    the start to its end."""
    key, stream_key = new_key(), new_key()
    body = chat_body(TINY, max_tokens=12, temperature=1.0)
    with stack.client() as one, stack.client(url=stack.api_urls[1]) as two:
        first = one.post(CHAT, json=body, headers={HEADER: key})
        assert first.status_code == 200, first.text
        replay = two.post(CHAT, json=body, headers={HEADER: key})
        assert replay.status_code == 200, replay.text
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json() == first.json()

        streamed = {**chat_body(TINY, max_tokens=150, ignore_eos=True), "stream": True}
        headers = {HEADER: stream_key}
        with connect_sse(one, "POST", CHAT, json=streamed, headers=headers) as s:
            assert s.response.status_code == 200
            first_id = s.response.headers["X-Ferry-Job-Id"]
            for event in s.iter_sse():  # leave after the first piece of text
                delta = json.loads(event.data)["choices"][0]["delta"]
                if delta.get("content"):
                    break
        texts, reasons = [], []
        for client in (two, one):
            with connect_sse(client, "POST", CHAT, json=streamed, headers=headers) as s:
                assert s.response.status_code == 200
                assert s.response.headers["Idempotent-Replayed"] == "true"
                assert s.response.headers["X-Ferry-Job-Id"] == first_id
                chunks = [json.loads(e.data) for e in s.iter_sse() if e.data != "[DONE]"]
            texts.append("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))
            reasons.append(chunks[-1]["choices"][0]["finish_reason"])
        assert reasons == ["length", "length"]
        assert texts[0] == texts[1] and texts[0]


async def test_a_retry_waits_for_the_first_answer_or_takes_over_a_dead_one(
    in_process_api: InProcessApi, sql: async_sessionmaker[AsyncSession]
) -> None:
    """The first request still running (its record has no answer yet, its lease holds): a
    retry waits for its answer, or gets a 409 after the wait; once the lease has lapsed
    (its replica died) the retry runs as new."""
    key = new_key()
    settings = ApiSettings(api_keys=[KEY_A, KEY_B], idempotency_wait_seconds=1.0)
    where = IdempotencyRecord.key == key

    async def set_record(**values: Any) -> None:
        async with sql() as session:
            await session.execute(IdempotencyRecord.__table__.update().where(where).values(values))
            await session.commit()

    async with (
        running_api(
            in_process_api.database_url,
            in_process_api.redis_url,
            in_process_api.object_dir,
            settings,
        ) as api,
        api.client() as http,
    ):
        first = await http.post("/v1/jobs", json=job_body(), headers={HEADER: key})
        answer = {"status": first.status_code, "body": first.json()}
        running = {"response_status": None, "response_body": None}
        await set_record(**running, locked_until=utcnow() + timedelta(seconds=60))
        assert_error(
            await http.post("/v1/jobs", json=job_body(), headers={HEADER: key}),
            409,
            "idempotency_key_in_use",
        )
        # The answer arrives while the retry waits: the retry replays it.
        retry = asyncio.create_task(http.post("/v1/jobs", json=job_body(), headers={HEADER: key}))
        await asyncio.sleep(0.3)
        assert not retry.done()
        await set_record(
            response_status=answer["status"], response_body=answer["body"], locked_until=None
        )
        replayed = await retry
        assert replayed.headers["Idempotent-Replayed"] == "true"
        assert replayed.json() == first.json()
        # A first request that died mid-way: the retry (even with another body) is new.
        await set_record(**running, locked_until=utcnow() - timedelta(seconds=1))
        jobs_before = await count(sql, Job)
        fresh = await http.post("/v1/jobs", json=job_body("fresh"), headers={HEADER: key})
        assert fresh.status_code == 202 and "Idempotent-Replayed" not in fresh.headers
        assert fresh.json()["id"] != first.json()["id"]
    assert await count(sql, Job) == jobs_before + 1


async def test_record_queries_on_both_backends(sessions: Sessions) -> None:
    """storage/repositories/idempotency.py on PostgreSQL and SQLite: one claim wins, an
    expired or lapsed record is taken over once, only the holder records or releases."""
    owner = ApiKey(id=new_key_id(), key_hash=hash_key(new_token()), name="t", source="admin")
    async with sessions.begin() as session:
        session.add(owner)
    now = utcnow()
    lease, expiry = now + timedelta(seconds=60), now + timedelta(hours=24)
    claim = {"route": "POST /v1/jobs", "body_hash": "h1", "now": now}
    # Never committed: the session's PostgreSQL database holds other tests' records, which
    # the deletes below would take with them.
    async with sessions() as session:
        args = {**claim, "locked_until": lease, "expires_at": expiry}
        assert await records.insert_claim(session, owner.id, "k", **args)
        assert not await records.insert_claim(session, owner.id, "k", **args)
        assert await records.insert_claim(session, owner.id, "other", **args)
        # Neither expired nor lapsed: nobody takes it over.
        assert not await records.take_over(session, owner.id, "k", **args)
        # Only the holder's lease records.
        answer = {"status": 202, "body": {"id": "job"}, "object_id": "job"}
        assert not await records.record_answer(session, owner.id, "k", locked_until=now, **answer)
        assert await records.record_answer(session, owner.id, "k", locked_until=lease, **answer)
        await records.release(session, owner.id, "k", lease)  # answered: kept
        found = await records.get_record(session, owner.id, "k")
        assert found is not None and found.response_status == 202 and found.locked_until is None
        # Expired: taken over, once.
        later = {
            **claim,
            "now": expiry,
            "locked_until": expiry + timedelta(seconds=60),
            "expires_at": expiry + timedelta(hours=24),
        }
        assert await records.take_over(session, owner.id, "k", **later)
        assert not await records.take_over(session, owner.id, "k", **later)
        found = await records.get_record(session, owner.id, "k")
        assert found is not None and found.response_status is None and found.object_id is None
        # Unanswered "other": released by its holder only.
        await records.release(session, owner.id, "other", now)
        assert await records.get_record(session, owner.id, "other") is not None
        await records.release(session, owner.id, "other", lease)
        assert await records.get_record(session, owner.id, "other") is None
        # Expired rows go in bounded batches; a row not yet expired stays.
        expiring = select(func.count()).select_from(IdempotencyRecord)
        due = await session.scalar(expiring.where(IdempotencyRecord.expires_at < expiry))
        assert await records.delete_expired(session, expiry, limit=1_000_000) == due
        assert await records.get_record(session, owner.id, "k") is not None
        far = expiry + timedelta(days=2)
        assert await records.delete_expired(session, far, limit=1) == 1
        while await records.delete_expired(session, far, limit=1):
            pass
        assert await records.get_record(session, owner.id, "k") is None
        await session.rollback()
