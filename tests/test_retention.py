"""Retention: the sweep deletes what is past its age (and nothing younger), a bounded batch
at a time, keeps images something still refers to, and runs beside live jobs; and
`DELETE /v1/jobs/{id}`."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.core.db import Database
from api.core.settings import ApiSettings
from api.ops.retention import RetentionPolicy, RetentionSweeper
from storage.db import create_db_engine, create_session_factory
from storage.keys import Lane, job_stream
from storage.migrate import upgrade
from storage.models import (
    ApiKey,
    Batch,
    BatchLineError,
    BatchStatus,
    Conversation,
    File,
    IdempotencyRecord,
    ImageOwner,
    Job,
    JobStatus,
    Message,
    WebhookDelivery,
    utcnow,
)
from storage.objects import LocalObjectStore, file_key, image_key
from storage.repositories import images as images_repo
from storage.settings import StorageSettings
from tests.conftest import KEY_A, REDIS_BASE, TINY, Stack, new_database, open_own_stack
from tests.fixtures.api import InProcessApi
from tests.helpers import assert_error, chat_body, submit, wait_job

DAY = 86400.0
NOW = utcnow()
OWNER = "key_retention"
SHA_GONE, SHA_IN_JOB, SHA_IN_TURN, SHA_FRESH = ("1" * 64, "2" * 64, "3" * 64, "4" * 64)


def policy(batch_size: int = 1000, **ages: float) -> RetentionPolicy:
    """Jobs, files, batches, images 30 days; conversations 90; webhooks 7 (the defaults)."""
    values: dict[str, Any] = {
        "jobs": 30 * DAY,
        "conversations": 90 * DAY,
        "files": 30 * DAY,
        "batches": 30 * DAY,
        "images": 30 * DAY,
        "webhook_deliveries": 7 * DAY,
        "batch_size": batch_size,
        "pause_seconds": 0.0,
    }
    return RetentionPolicy(**(values | ages))


@pytest.fixture(scope="module")
def retention_pg() -> Iterator[str]:
    with new_database("ferry_test_retention") as url:
        yield url


@pytest.fixture(params=["postgresql", "sqlite"])
async def sessions(
    request: pytest.FixtureRequest, tmp_path: Path, retention_pg: str
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """An empty database of this module's own (its sweep deletes whatever is old), on
    both backends."""
    if request.param == "postgresql":
        url = retention_pg
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'ferry.db'}"
        await asyncio.to_thread(upgrade, url)
    engine = create_db_engine(StorageSettings(database_url=url))
    factory = create_session_factory(engine)
    try:
        async with factory() as session:
            for table in (
                "webhook_deliveries",
                "idempotency_keys",
                "image_owners",
                "batch_line_errors",
                "messages",
                "jobs",
                "conversations",
                "batches",
                "files",
                "api_keys",
            ):
                await session.execute(text(f"DELETE FROM {table}"))
            session.add(ApiKey(id=OWNER, key_hash=os.urandom(32).hex()))
            await session.commit()
        yield factory
    finally:
        await engine.dispose()


@pytest.fixture
def objects(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "objects")


def sweeper(
    sessions: async_sessionmaker[AsyncSession], objects: LocalObjectStore, pol: RetentionPolicy
) -> RetentionSweeper:
    # The sweep itself never uses Redis (only the periodic loop takes its turn there).
    return RetentionSweeper(
        Database(sessions), Redis.from_url(REDIS_BASE), objects, pol, interval_seconds=60
    )


def ago(days: float) -> datetime:
    return NOW - timedelta(days=days)


_serial = 0


def job(days_finished: float | None, made_days: float | None = None, **fields: Any) -> Job:
    """A job finished `days_finished` ago (`None`: still running), made `made_days` ago
    (by default a day before it finished)."""
    global _serial
    _serial += 1
    finished = ago(days_finished) if days_finished is not None else None
    made = ago(made_days) if made_days is not None else (finished or NOW) - timedelta(days=1)
    values: dict[str, Any] = {
        "id": f"job_{int(made.timestamp() * 1000):012x}{_serial:012x}",
        "owner_id": OWNER,
        "model": TINY,
        "lane": Lane.INTERACTIVE,
        "status": JobStatus.SUCCEEDED if finished else JobStatus.RUNNING,
        "request": {"messages": [{"role": "user", "content": "hi"}]},
        "created_at": made,
        "finished_at": finished,
        "deltas": ["a", "b"],
    }
    return Job(**(values | fields))


def image_request(sha256: str) -> dict[str, Any]:
    ref = {"sha256": sha256, "mime": "image/png", "width": 1, "height": 1}
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": ref}]}]}


async def ids(sessions: async_sessionmaker[AsyncSession], column: Any) -> set[Any]:
    async with sessions() as session:
        return set(await session.scalars(select(column)))


async def test_the_sweep_deletes_only_what_is_past_its_age(
    sessions: async_sessionmaker[AsyncSession], objects: LocalObjectStore
) -> None:
    old_done, young_done, old_running = job(31), job(29), job(None, made_days=60)
    old_failed = job(31, status=JobStatus.CANCELLED)
    async with sessions() as session:
        session.add_all(
            [
                Conversation(id="conv_idle", owner_id=OWNER, updated_at=ago(91)),
                Conversation(id="conv_recent", owner_id=OWNER, updated_at=ago(89)),
                # Idle, but a job is queued on it: it stays.
                Conversation(id="conv_in_use", owner_id=OWNER, updated_at=ago(200)),
                File(
                    id="file_old",
                    owner_id=OWNER,
                    purpose="batch",
                    filename="a",
                    bytes=1,
                    created_at=ago(31),
                ),
                File(
                    id="file_young",
                    owner_id=OWNER,
                    purpose="batch",
                    filename="b",
                    bytes=1,
                    created_at=ago(29),
                ),
                # Old, but the input of a batch still validating.
                File(
                    id="file_in_use",
                    owner_id=OWNER,
                    purpose="batch",
                    filename="c",
                    bytes=1,
                    created_at=ago(40),
                ),
            ]
        )
        await session.flush()
        session.add_all(
            [
                *(
                    Message(conversation_id=c, role="user", content="x")
                    for c in ("conv_idle", "conv_idle", "conv_recent")
                ),
                old_done,
                young_done,
                old_running,
                old_failed,
                job(None, status=JobStatus.QUEUED, conversation_id="conv_in_use"),
                batch("batch_old", BatchStatus.COMPLETED, 31),
                batch("batch_young", BatchStatus.COMPLETED, 29),
                batch("batch_open", BatchStatus.VALIDATING, 40, input_file_id="file_in_use"),
                WebhookDelivery(
                    id="msg_old",
                    owner_id=OWNER,
                    url="u",
                    object_kind="job",
                    object_id="x",
                    event="completed",
                    created_at=ago(8),
                    delivered_at=ago(8),
                ),
                WebhookDelivery(
                    id="msg_young",
                    owner_id=OWNER,
                    url="u",
                    object_kind="job",
                    object_id="x",
                    event="completed",
                    created_at=ago(6),
                    failed_at=ago(6),
                ),
                WebhookDelivery(
                    id="msg_due",
                    owner_id=OWNER,
                    url="u",
                    object_kind="job",
                    object_id="x",
                    event="completed",
                    created_at=ago(8),
                ),
                IdempotencyRecord(
                    owner_id=OWNER, key="expired", route="r", body_hash="h", expires_at=ago(0.01)
                ),
                IdempotencyRecord(
                    owner_id=OWNER, key="live", route="r", body_hash="h", expires_at=ago(-0.5)
                ),
            ]
        )
        await session.flush()
        session.add_all(
            [
                job(40, batch_id="batch_old", custom_id="1", lane=Lane.BULK),
                job(40, batch_id="batch_young", custom_id="1", lane=Lane.BULK),
                BatchLineError(batch_id="batch_old", line=2, code="c", message="m"),
            ]
        )
        await session.commit()
    for name in ("file_old", "file_young", "file_in_use"):
        objects.put_bytes(file_key(name), b"{}", "application/jsonl")

    report = await sweeper(sessions, objects, policy()).sweep_once(NOW)

    assert await ids(sessions, Job.id) >= {young_done.id, old_running.id}
    assert not await ids(sessions, Job.id) & {old_done.id, old_failed.id}
    assert await ids(sessions, Conversation.id) == {"conv_recent", "conv_in_use"}
    assert await ids(sessions, Message.conversation_id) == {"conv_recent"}
    assert await ids(sessions, File.id) == {"file_young", "file_in_use"}
    assert not objects.exists(file_key("file_old"))
    assert objects.exists(file_key("file_young")) and objects.exists(file_key("file_in_use"))
    assert await ids(sessions, Batch.id) == {"batch_young", "batch_open"}
    assert await ids(sessions, Job.batch_id) == {None, "batch_young"}
    assert await ids(sessions, BatchLineError.id) == set()
    assert await ids(sessions, WebhookDelivery.id) == {"msg_young", "msg_due"}
    assert await ids(sessions, IdempotencyRecord.key) == {"live"}
    assert report.deleted["jobs"] == 2 and report.deleted["batch_lines"] == 1

    # Nothing left past its age: a second sweep deletes nothing.
    again = await sweeper(sessions, objects, policy()).sweep_once(NOW)
    assert sum(again.deleted.values()) == 0


def batch(batch_id: str, status: BatchStatus, days: float, **fields: Any) -> Batch:
    values: dict[str, Any] = {
        "id": batch_id,
        "owner_id": OWNER,
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file_x",
        "completion_window": "24h",
        "status": status,
        "created_at": ago(days),
        "expires_at": ago(days - 1),
    }
    return Batch(**(values | fields))


async def test_each_statement_deletes_at_most_one_batch_of_rows(
    sessions: async_sessionmaker[AsyncSession], objects: LocalObjectStore
) -> None:
    async with sessions() as session:
        session.add_all([job(31) for _ in range(35)])
        session.add(batch("batch_big", BatchStatus.COMPLETED, 31))
        session.add(Conversation(id="conv_long", owner_id=OWNER, updated_at=ago(101)))
        session.add_all(
            Conversation(id=f"conv_{n}", owner_id=OWNER, updated_at=ago(100)) for n in range(4)
        )
        await session.flush()
        session.add_all(
            job(40, batch_id="batch_big", custom_id=str(n), lane=Lane.BULK) for n in range(25)
        )
        session.add_all(
            Message(conversation_id="conv_long", role="user", content="x") for _ in range(23)
        )
        await session.commit()

    report = await sweeper(sessions, objects, policy(batch_size=10)).sweep_once(NOW)

    assert report.deleted["jobs"] == 35 and report.statements["jobs"] == 4
    # A batch's lines go first, ten at a time, then its row.
    assert report.deleted["batch_lines"] == 25 and report.statements["batch_lines"] == 3
    assert report.deleted["batches"] == 1
    # The long conversation goes alone, its messages ten at a time; the four short ones
    # (one row each) go together.
    assert report.deleted["conversations"] == 5
    assert report.statements["conversations"] == 3 + 1 + 1 + 1
    assert await ids(sessions, Job.id) == set() and await ids(sessions, Message.id) == set()


async def test_images_go_once_nothing_remaining_refers_to_them(
    sessions: async_sessionmaker[AsyncSession], objects: LocalObjectStore
) -> None:
    async with sessions() as session:
        session.add(Conversation(id="conv_kept", owner_id=OWNER, updated_at=ago(1)))
        await session.flush()
        session.add_all(
            [
                # Its only job is past its age: the image goes with it.
                job(31, request=image_request(SHA_GONE)),
                # Made when the image was last used, finished long after: it stays, and so
                # does its image.
                job(5, made_days=40, request=image_request(SHA_IN_JOB)),
                Message(
                    conversation_id="conv_kept",
                    role="user",
                    content="look",
                    images=[{"sha256": SHA_IN_TURN, "mime": "image/png"}],
                ),
                *(
                    ImageOwner(
                        sha256=sha, owner_id=OWNER, created_at=ago(60), last_used_at=ago(days)
                    )
                    for sha, days in (
                        (SHA_GONE, 32),
                        (SHA_IN_JOB, 40),
                        (SHA_IN_TURN, 40),
                        (SHA_FRESH, 1),
                    )
                ),
            ]
        )
        await session.commit()
    for sha in (SHA_GONE, SHA_IN_JOB, SHA_IN_TURN, SHA_FRESH):
        objects.put_bytes(image_key(sha), b"png", "image/png")

    report = await sweeper(sessions, objects, policy()).sweep_once(NOW)

    assert report.deleted["images"] == 1 and report.kept["images"] == 2
    assert not objects.exists(image_key(SHA_GONE))
    for sha in (SHA_IN_JOB, SHA_IN_TURN, SHA_FRESH):
        assert objects.exists(image_key(sha)), sha
    assert await ids(sessions, ImageOwner.sha256) == {SHA_IN_JOB, SHA_IN_TURN, SHA_FRESH}
    # The ones found referenced count as used now: the next sweep does not check them again.
    again = await sweeper(sessions, objects, policy()).sweep_once(NOW)
    assert again.kept["images"] == 0 and again.deleted["images"] == 0


async def test_an_image_an_intake_is_storing_is_left_alone(
    sessions: async_sessionmaker[AsyncSession], objects: LocalObjectStore
) -> None:
    """Intake holds an image's lock from recording its use until its bytes are stored: a
    sweep meanwhile leaves the image (bytes and rows) for a later sweep."""
    if sessions.kw["bind"].dialect.name != "postgresql":
        pytest.skip("advisory locks are PostgreSQL's; SQLite runs one process")
    async with sessions() as session:
        session.add(ImageOwner(sha256=SHA_GONE, owner_id=OWNER, last_used_at=ago(40)))
        await session.commit()
    objects.put_bytes(image_key(SHA_GONE), b"png", "image/png")
    async with sessions() as intake:
        await images_repo.hold_for_use(intake, [SHA_GONE])
        report = await sweeper(sessions, objects, policy()).sweep_once(NOW)
        assert report.deleted["images"] == 0 and objects.exists(image_key(SHA_GONE))
        await intake.rollback()
    report = await sweeper(sessions, objects, policy()).sweep_once(NOW)
    assert report.deleted["images"] == 1 and not objects.exists(image_key(SHA_GONE))


async def test_an_age_of_zero_keeps_rows_for_good(
    sessions: async_sessionmaker[AsyncSession], objects: LocalObjectStore
) -> None:
    async with sessions() as session:
        session.add(job(3650))
        await session.commit()
    await sweeper(sessions, objects, policy(jobs=0)).sweep_once(NOW)
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Job)) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FERRY_RETAIN_JOBS_SECONDS", "-1"),
        ("FERRY_RETAIN_CONVERSATIONS_SECONDS", "-86400"),
        ("FERRY_RETAIN_FILES_SECONDS", "-5"),
        ("FERRY_RETAIN_BATCHES_SECONDS", "-1"),
        ("FERRY_RETAIN_IMAGES_SECONDS", "-1"),
        ("FERRY_RETAIN_WEBHOOK_DELIVERIES_SECONDS", "-1"),
        ("FERRY_RETENTION_BATCH_SIZE", "0"),
        ("FERRY_RETENTION_INTERVAL_SECONDS", "0"),
        ("FERRY_RETENTION_PAUSE_SECONDS", "-1"),
    ],
)
def test_retention_settings_that_make_no_sense_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=name.removeprefix("FERRY_").lower()):
        ApiSettings()


# --- DELETE /v1/jobs/{id} --------------------------------------------------------------


async def test_a_finished_job_is_deleted_with_its_event_stream(
    in_process_api: InProcessApi, api_client: httpx.AsyncClient
) -> None:
    created = await api_client.post("/v1/jobs", json=chat_body(TINY))
    job_id = created.json()["id"]
    # Queued (no worker here): not finished, so not deleted.
    assert_error(await api_client.delete(f"/v1/jobs/{job_id}"), 409, "job_not_finished")
    assert (await api_client.get(f"/v1/jobs/{job_id}")).status_code == 200

    assert (await api_client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    redis = Redis.from_url(in_process_api.redis_url)
    try:
        assert await redis.exists(job_stream(job_id))
        deleted = await api_client.delete(f"/v1/jobs/{job_id}")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"id": job_id, "object": "job.deleted", "deleted": True}
        assert not await redis.exists(job_stream(job_id))
    finally:
        await redis.aclose()
    assert_error(await api_client.get(f"/v1/jobs/{job_id}"), 404, "not_found")
    assert_error(await api_client.delete(f"/v1/jobs/{job_id}"), 404, "not_found")
    listed = (await api_client.get("/v1/jobs", params={"limit": 100})).json()["data"]
    assert job_id not in {j["id"] for j in listed}


async def test_a_missing_job_is_not_found(api_client: httpx.AsyncClient) -> None:
    assert_error(await api_client.delete("/v1/jobs/job_000000000000nothere"), 404, "not_found")


# --- beside live jobs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweeping_stack(model_cache: Path, logs: Path, s3_url: str) -> Iterator[Stack]:
    """One API process sweeping every half second, ten rows a statement, and a
    transformers worker serving the tiny model, on a database of their own."""
    # No other test stack uses Redis db 0.
    with open_own_stack("ferry_test_sweeping", 0, model_cache, s3_url) as s:
        s.add_api(
            "api-sweeping",
            logs,
            FERRY_RETENTION_INTERVAL_SECONDS="0.5",
            FERRY_RETENTION_BATCH_SIZE="10",
            FERRY_RETENTION_PAUSE_SECONDS="0.02",
            FERRY_RETAIN_JOBS_SECONDS=str(30 * DAY),
        )
        s.add_worker("worker-sweeping", TINY, "transformers", logs)
        yield s


def test_the_sweep_runs_while_jobs_run(sweeping_stack: Stack) -> None:
    """Old finished jobs are swept by the API process while a worker runs new ones: every
    new one completes (and stays), every old one goes."""
    with sweeping_stack.client(KEY_A) as client:
        new = [
            submit(client, chat_body(TINY, f"Count to {n}.", max_tokens=24))["id"]
            for n in range(12)
        ]
        # Inserted while those run: the next sweep deletes them beside them.
        old = asyncio.run(_insert_old_jobs(sweeping_stack.database_url, 300))
        finished = [wait_job(client, job_id) for job_id in new]
        assert {j["status"] for j in finished} == {"succeeded"}
        deadline = time.monotonic() + 60
        while asyncio.run(_remaining(sweeping_stack.database_url, old)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert asyncio.run(_remaining(sweeping_stack.database_url, old)) == set()
        for job_id in new:
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200


async def _insert_old_jobs(url: str, count: int) -> list[str]:
    engine = create_db_engine(StorageSettings(database_url=url))
    try:
        async with create_session_factory(engine)() as session:
            # The key's row exists once the API has started.
            owner = await session.scalar(select(ApiKey.id).where(ApiKey.source == "env"))
            assert owner is not None
            rows = [job(31 + n / 1000, owner_id=owner) for n in range(count)]
            session.add_all(rows)
            await session.commit()
            return [r.id for r in rows]
    finally:
        await engine.dispose()


async def _remaining(url: str, job_ids: list[str]) -> set[str]:
    engine = create_db_engine(StorageSettings(database_url=url))
    try:
        async with create_session_factory(engine)() as session:
            return set(await session.scalars(select(Job.id).where(Job.id.in_(job_ids))))
    finally:
        await engine.dispose()


async def test_a_job_that_takes_images_from_its_conversation_marks_them_used(
    in_process_api: InProcessApi, api_client: httpx.AsyncClient
) -> None:
    """The reference check reads only jobs made up to an image's last use: a job that takes
    an image from stored history (not from its own request) must count as a use."""
    sha = os.urandom(32).hex()
    conversation = (await api_client.post("/v1/conversations", json={})).json()["id"]
    engine = create_db_engine(StorageSettings(database_url=in_process_api.database_url))
    sessions = create_session_factory(engine)
    try:
        async with sessions() as session:
            owner = await session.scalar(
                select(Conversation.owner_id).where(Conversation.id == conversation)
            )
            session.add(
                Message(
                    conversation_id=conversation,
                    role="user",
                    content="look",
                    images=[{"sha256": sha, "mime": "image/png", "width": 1, "height": 1}],
                )
            )
            session.add(Message(conversation_id=conversation, role="assistant", content="ok"))
            session.add(ImageOwner(sha256=sha, owner_id=owner, last_used_at=ago(100)))
            await session.commit()
        body = {**chat_body(TINY, "And now?"), "conversation_id": conversation}
        created = await api_client.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        async with sessions() as session:
            used = await session.scalar(
                select(ImageOwner.last_used_at).where(ImageOwner.sha256 == sha)
            )
        assert used is not None and used > utcnow() - timedelta(minutes=5)
    finally:
        await engine.dispose()
