"""Job deadlines: a job still queued at its deadline ends `expired` and never runs (the
API's expiry sweep, the worker's claim), its stream ends with `expired`; a running job is
not cut; `deadline_seconds` and `Cancel-After` are checked (400, nothing stored)."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from redis import Redis
from sqlalchemy import func, select

from api.core.settings import ApiSettings
from api.jobs.deadlines import parse_duration
from storage.models import Job, JobStatus, WebhookDelivery, utcnow
from storage.registry import ServedModel, WorkerBeat, announce, now_epoch
from storage.repositories import api_keys, jobs
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, TINY, Sessions, Stack, new_database
from tests.fixtures.api import InProcessApi, running_api
from tests.helpers import assert_error, chat_body, read_events, submit, wait_job

pytestmark = pytest.mark.timeout(300)

DEADLINE_REDIS_DB = 0  # no test stack or other module uses db 0


# -- Cancel-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h30m", 5400),
        ("1h30m15s", 5415),
        ("1.5h", 5400),
        ("250ms", 0.25),
        ("90", 90),
        ("2.5", 2.5),
        (" 2m ", 120),
    ],
)
def test_cancel_after_reads_durations_and_plain_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "soon", "5x", "-5", "-5s", "0", "0s", "m", "5 m", "1e3", "1h-30m", "nan", "inf"]
)
def test_cancel_after_refuses_what_is_not_a_positive_duration(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# -- settings ----------------------------------------------------------------------------


def test_a_default_deadline_above_the_maximum_is_a_startup_error() -> None:
    with pytest.raises(ValidationError, match="FERRY_DEADLINE_INTERACTIVE_SECONDS"):
        ApiSettings(deadline_interactive_seconds=100, max_deadline_seconds=10)


@pytest.mark.parametrize(
    "name", ["deadline_interactive_seconds", "max_deadline_seconds", "deadline_sweep_seconds"]
)
def test_a_deadline_setting_that_is_not_positive_is_a_startup_error(name: str) -> None:
    with pytest.raises(ValidationError, match=name):
        ApiSettings(**{name: 0})


# -- the repository: expiry and the claim guard ------------------------------------------


async def _queued(
    sessions: Sessions,
    deadline_in: float | None,
    status: JobStatus = JobStatus.QUEUED,
    **extra: Any,
) -> Job:
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
        job = Job(
            id=jobs.new_job_id(),
            owner_id=key.id,
            model="m",
            kind="chat",
            lane="interactive",
            status=status,
            priority=0,
            request={"messages": [], "max_tokens": 4},
            attempts=0,
            deadline_at=None if deadline_in is None else utcnow() + timedelta(seconds=deadline_in),
            **extra,
        )
        await jobs.insert_jobs(session, [job])
    return job


async def test_expiry_ends_only_queued_jobs_past_their_deadline(sessions: Sessions) -> None:
    past = await _queued(sessions, -5)
    hooked = await _queued(
        sessions, -1, webhook_url="https://example.com/hook", webhook_events=["completed"]
    )
    future = await _queued(sessions, 600)
    undated = await _queued(sessions, None)
    running = await _queued(sessions, -5, JobStatus.RUNNING)
    mine = {past.id, hooked.id, future.id, undated.id, running.id}
    async with sessions.begin() as session:
        ended = await jobs.expire_due(session, limit=1000, job_ids=sorted(mine))
    assert {job.id for job in ended} == {past.id, hooked.id}
    async with sessions() as session:
        rows = {j.id: j for j in (await session.scalars(select(Job).where(Job.id.in_(mine)))).all()}
        hooks = (
            await session.scalars(
                select(WebhookDelivery).where(WebhookDelivery.object_id.in_(mine))
            )
        ).all()
    for job_id in (past.id, hooked.id):
        row = rows[job_id]
        assert row.status == JobStatus.EXPIRED
        assert row.error_code == "expired" and row.error and "deadline" in row.error
        assert row.finished_at is not None and row.started_at is None and row.attempts == 0
    assert rows[future.id].status == JobStatus.QUEUED
    assert rows[undated.id].status == JobStatus.QUEUED
    assert rows[running.id].status == JobStatus.RUNNING  # a running job is not cut
    # The webhook's `completed` delivery, as a cancel writes it; none for jobs without one.
    assert [(h.object_id, h.event) for h in hooks] == [(hooked.id, "completed")]


async def test_a_claim_expires_a_job_past_its_deadline_instead_of_running_it(
    sessions: Sessions,
) -> None:
    from worker.group_commit import claim_committer

    late = await _queued(sessions, -1)
    timely = await _queued(sessions, 600)
    async with sessions.begin() as session:
        assert await jobs.claim_jobs(session, [late.id], "worker-a", 30) == {}
    claims = claim_committer(sessions, "worker-a", 30)
    claims.start()
    try:
        got_late, got_timely = await asyncio.gather(
            claims.submit(late.id), claims.submit(timely.id)
        )
    finally:
        await claims.stop()
    assert got_late is not None and got_late.status == JobStatus.EXPIRED
    assert got_timely is not None and got_timely.status == JobStatus.RUNNING
    async with sessions() as session:
        row = await session.get(Job, late.id)
    assert row is not None
    assert row.status == JobStatus.EXPIRED and row.started_at is None and row.attempts == 0
    assert row.worker_id is None


# -- the API in process: no worker serves the model, the sweep ends the job ---------------


@pytest.fixture(scope="module")
def deadline_database() -> Iterator[str]:
    with new_database("ferry_test_deadline") as url:
        yield url


@pytest.fixture(scope="module")
async def deadline_api(
    deadline_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcessApi]:
    """The API with a fast expiry sweep, a short maximum and a model announced with no
    worker behind it: its jobs stay queued until their deadline."""
    redis_url = f"{REDIS_BASE}/{DEADLINE_REDIS_DB}"
    with Redis.from_url(redis_url) as client:
        client.flushdb()
        tiny = ServedModel(TINY, 2048, "vllm", created=now_epoch(), root=TINY)
        # ...as live (a heartbeat, no process): synchronous requests do not wait for a
        # worker (FERRY_SYNC_WAIT_SECONDS), and no worker ever claims the jobs.
        announce(client, tiny, worker=WorkerBeat("deadline", TINY, "vllm", 0, time.time()))
    settings = ApiSettings(
        api_keys=[KEY_A, KEY_B],
        deadline_sweep_seconds=0.2,
        # One released job per key at a time: a second one is held (api/jobs/dispatch.py).
        default_max_concurrent_jobs=1,
        deadline_interactive_seconds=1800,
        max_deadline_seconds=7200,
    )
    objects: Path = tmp_path_factory.mktemp("deadline-objects")
    async with running_api(deadline_database, redis_url, objects, settings) as api:
        yield api
    with Redis.from_url(redis_url) as client:
        client.flushdb()


async def _job_count(api: InProcessApi) -> int:
    async with _rows(api) as sessions, sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


@asynccontextmanager
async def _rows(api: InProcessApi) -> AsyncIterator[Sessions]:
    """Sessions on the API's database, to read rows as SQL has them."""
    from storage.db import create_db_engine, create_session_factory
    from storage.settings import StorageSettings

    engine = create_db_engine(StorageSettings(database_url=api.database_url))
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def test_a_queued_job_past_its_deadline_ends_expired_with_its_stream(
    deadline_api: InProcessApi,
) -> None:
    async with deadline_api.client() as client:
        made = await client.post("/v1/jobs", json=chat_body(TINY, deadline_seconds=0.3))
        assert made.status_code == 202, made.text
        job = made.json()
        assert job["deadline_at"] == pytest.approx(job["created_at"] + 0.3, abs=0.2)
        # The stream ends by itself once the sweep has ended the job.
        stream = await client.get(f"/v1/jobs/{job['id']}/events")
        final = (await client.get(f"/v1/jobs/{job['id']}")).json()
    events = [line for line in stream.text.splitlines() if line.startswith(("event:", "id:"))]
    assert events[-2:] == ["id: 0-1", "event: expired"], stream.text
    assert final["status"] == "expired"
    assert final["started_at"] is None and final["attempts"] == 0
    assert final["finished_at"] >= final["deadline_at"]
    assert final["error"]["code"] == "expired"


async def test_a_held_job_that_expires_is_never_released(deadline_api: InProcessApi) -> None:
    async with deadline_api.client(KEY_B) as client:
        first = await client.post("/v1/jobs", json=chat_body(TINY))
        assert first.status_code == 202, first.text
        held = await client.post("/v1/jobs", json=chat_body(TINY, deadline_seconds=0.3))
        assert held.status_code == 202, held.text
        await client.get(f"/v1/jobs/{held.json()['id']}/events")  # ends when it expires
        await client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    async with _rows(deadline_api) as sessions, sessions() as session:
        released = await session.get(Job, first.json()["id"])
        row = await session.get(Job, held.json()["id"])
    assert released is not None and released.enqueued_at is not None
    assert row is not None and row.status == JobStatus.EXPIRED
    assert row.enqueued_at is None  # the dispatcher never sent it to the workers


async def test_deadline_from_header_field_or_default(deadline_api: InProcessApi) -> None:
    async with deadline_api.client() as client:

        async def deadline_of(body: dict[str, Any], **headers: str) -> float:
            made = await client.post("/v1/jobs", json=body, headers=headers)
            assert made.status_code == 202, made.text
            job = made.json()
            await client.post(f"/v1/jobs/{job['id']}/cancel")  # nothing left queued
            return float(job["deadline_at"] - job["created_at"])

        assert await deadline_of(chat_body(TINY)) == pytest.approx(1800, abs=2)
        assert await deadline_of(chat_body(TINY), **{"Cancel-After": "1h30m"}) == pytest.approx(
            5400, abs=2
        )
        assert await deadline_of(chat_body(TINY, deadline_seconds=60)) == pytest.approx(60, abs=2)
        # Both: the earlier applies.
        both = await deadline_of(chat_body(TINY, deadline_seconds=600), **{"Cancel-After": "2m"})
        assert both == pytest.approx(120, abs=2)


async def test_a_chat_completion_whose_job_expired_answers_504(
    deadline_api: InProcessApi,
) -> None:
    async with deadline_api.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json=chat_body(TINY, deadline_seconds=0.3)
        )
        error = assert_error(answer, 504, "expired")
        assert error["type"] == "timeout_error"
        streamed = await client.post(
            "/v1/chat/completions",
            json=chat_body(TINY, stream=True),
            headers={"Cancel-After": "300ms"},
        )
    assert streamed.status_code == 200
    data = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert '"code": "expired"' in data[-2], streamed.text


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("deadline_seconds", -5),
        ("deadline_seconds", 0),
        ("deadline_seconds", "30"),
        ("deadline_seconds", True),
        ("deadline_seconds", 7201),
    ],
)
async def test_a_bad_deadline_seconds_is_a_400_naming_it(
    deadline_api: InProcessApi, field: str, value: Any
) -> None:
    before = await _job_count(deadline_api)
    async with deadline_api.client() as client:
        for route in ("/v1/jobs", "/v1/chat/completions"):
            answer = await client.post(route, json=chat_body(TINY, **{field: value}))
            error = assert_error(answer, 400)
            assert error["param"] == field, error
            assert field in error["message"]
        completion = await client.post(
            "/v1/completions", json={"model": TINY, "prompt": "Hi", field: value}
        )
        assert assert_error(completion, 400)["param"] == field
    assert await _job_count(deadline_api) == before


@pytest.mark.parametrize("header", ["soon", "0", "-5s", "5x", "1e3", "3h"])
async def test_a_bad_cancel_after_is_a_400_naming_it(
    deadline_api: InProcessApi, header: str
) -> None:
    before = await _job_count(deadline_api)
    async with deadline_api.client() as client:
        for route in ("/v1/jobs", "/v1/chat/completions"):
            answer = await client.post(
                route, json=chat_body(TINY), headers={"Cancel-After": header}
            )
            error = assert_error(answer, 400)
            assert error["param"] == "Cancel-After", error
            assert "Cancel-After" in error["message"]
    assert await _job_count(deadline_api) == before


def test_a_batch_line_past_its_deadline_is_an_error_line_of_code_expired() -> None:
    from types import SimpleNamespace

    from api.batches.output import _result_line
    from storage.models import BatchStatus

    row = SimpleNamespace(
        id="job_1",
        custom_id="line-1",
        status=JobStatus.EXPIRED,
        error=jobs.EXPIRED_MESSAGE,
        error_code="expired",
    )
    target, line = _result_line(row, BatchStatus.COMPLETED)  # type: ignore[arg-type]
    assert target == "errors"
    assert line["error"] == {"code": "expired", "message": jobs.EXPIRED_MESSAGE}
    assert line["response"]["status_code"] == 504


# -- real processes: a worker's claim, a running job -------------------------------------


def test_a_job_past_its_deadline_never_reaches_the_engine(stack: Stack) -> None:
    """Past its deadline before a worker could claim it: whichever guard gets to it (the
    sweep or the claim), it ends `expired` unclaimed and its stream ends with `expired`."""
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=8, deadline_seconds=0.001))
        events = read_events(client, job["id"])
        final = wait_job(client, job["id"])
    assert [(e.id, e.type) for e in events] == [("0-1", "expired")]
    assert final["status"] == "expired", final
    assert final["started_at"] is None and final["attempts"] == 0
    assert final["result"] is None and final["usage"] is None


def test_a_running_job_is_not_cut_by_its_deadline(stack: Stack) -> None:
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=2000, ignore_eos=True, deadline_seconds=2))
        events = read_events(client, job["id"])
        final = wait_job(client, job["id"])
    assert final["status"] == "succeeded", final
    assert [e.type for e in events[-2:]] == ["usage", "done"]
    assert final["usage"]["completion_tokens"] == 2000
    # It started before its deadline and ran past it.
    assert final["started_at"] < final["deadline_at"] < final["finished_at"], final


def test_the_job_list_filters_by_expired(stack: Stack) -> None:
    with stack.client(KEY_B) as client:
        job = submit(client, chat_body(TINY, max_tokens=8, deadline_seconds=0.001))
        wait_job(client, job["id"])
        listed = client.get("/v1/jobs", params={"status": "expired"})
    assert listed.status_code == 200
    assert job["id"] in [j["id"] for j in listed.json()["data"]]
