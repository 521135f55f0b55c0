"""Liveness, readiness and overload (docs/operations.md): workers' heartbeats expire and
are read without SCAN; a model whose last worker is gone leaves `/v1/models` after its
grace period, synchronous requests for it get 503 `model_unavailable`; a declared model
(FERRY_MODELS) takes jobs with no worker and runs them when one starts; `/ready` follows;
a model's full backlog is a 503 `model_overloaded`; `/health` is SQL and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websocket
from pydantic import ValidationError
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.core.settings import ApiSettings
from ferry_testing.procs import wait_until
from storage.db import create_db_engine, create_session_factory
from storage.keys import WORKERS_LIVE
from storage.models import Job
from storage.registry import ModelRegistry, ServedModel, WorkerBeat, announce, now_epoch
from storage.settings import StorageSettings
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, new_database, open_stack
from tests.fixtures.api import running_api
from tests.helpers import assert_error, chat_body, wait_job

pytestmark = pytest.mark.timeout(900)

REDIS_DB = 14  # emptied before and after each test (tests/fixtures/redis.py)
REDIS_URL = f"{REDIS_BASE}/{REDIS_DB}"


def beat(worker_id: str, model: str, *, concurrency: int = 0) -> WorkerBeat:
    return WorkerBeat(worker_id, model, "vllm", 0, time.time(), concurrency=concurrency)


def served(name: str) -> ServedModel:
    return ServedModel(name, 2048, "vllm", created=now_epoch(), root=name)


# -- the registry over a real Redis ----------------------------------------------------


async def test_heartbeats_expire_and_are_pruned_and_forget_removes_at_once(
    redis_client: Redis,
) -> None:
    registry = ModelRegistry(redis_client, snapshot_seconds=0)
    await registry.heartbeat(beat("w-short", "m"), served("m"), ttl_seconds=0.3)
    await registry.heartbeat(beat("w-long", "m"), served("m"), ttl_seconds=60)
    assert {w.worker_id for w in await registry.live_workers()} == {"w-short", "w-long"}
    await asyncio.sleep(0.5)
    assert [w.worker_id for w in await registry.live_workers()] == ["w-long"]
    # The expired member was pruned by that read, beat and all.
    assert await redis_client.zrange(WORKERS_LIVE, 0, -1) == [b"w-long"]
    assert await redis_client.hkeys("ferry:workers:beats") == [b"w-long"]
    await registry.forget_worker("w-long")
    assert await registry.live_workers() == []


async def test_a_model_without_workers_leaves_after_its_grace_unless_declared(
    redis_client: Redis,
) -> None:
    registry = ModelRegistry(redis_client, snapshot_seconds=0)
    await registry.heartbeat(beat("w1", "gone"), served("gone"), ttl_seconds=0.2)
    await registry.heartbeat(beat("w2", "kept"), served("kept"), ttl_seconds=0.2)
    states = await registry.served(grace_seconds=1.0)
    assert {n: s.live_workers for n, s in states.items()} == {"gone": 1, "kept": 1}
    await asyncio.sleep(0.4)  # both beats expired: within the grace period
    states = await registry.served(grace_seconds=1.0, declared=["kept", "never-seen"])
    assert {n: s.live_workers for n, s in states.items()} == {
        "gone": 0,
        "kept": 0,
        "never-seen": 0,
    }
    await asyncio.sleep(1.0)  # past it
    states = await registry.served(grace_seconds=1.0, declared=["kept", "never-seen"])
    assert sorted(states) == ["kept", "never-seen"]
    assert states["kept"].model.max_model_len == 2048  # as its worker announced it
    assert states["never-seen"].model.max_model_len == 0  # not known yet
    # The models hash keeps both (the batch supervisor's view).
    assert sorted(await registry.models()) == ["gone", "kept"]


def _commands_during(url: str, action: Iterator[None]) -> list[str]:
    """The commands Redis ran (MONITOR) while `action` ran."""
    seen: list[str] = []
    marker = f"monitor-stop-{time.time_ns()}"
    client = SyncRedis.from_url(url)
    started = threading.Event()

    def watch() -> None:
        with client.monitor() as monitor:
            started.set()
            for entry in monitor.listen():
                command = str(entry["command"])
                if marker in command:
                    return
                seen.append(command)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    started.wait(5)
    time.sleep(0.2)  # MONITOR is on once its reply has come; the thread is in listen()
    for _ in action:
        pass
    client.echo(marker)
    thread.join(10)
    return seen


async def test_registry_reads_never_scan_the_keyspace(redis_client: Redis) -> None:
    """With many unrelated keys (some shaped like the old per-worker keys), a read finds
    the live workers by their set alone: MONITOR sees no SCAN or KEYS."""
    pipe = redis_client.pipeline(transaction=False)
    for i in range(2000):
        pipe.set(f"ferry:job:{i}:events", "x")
        pipe.set(f"ferry:worker:stale-{i}", "{}")
    await pipe.execute()
    registry = ModelRegistry(redis_client, snapshot_seconds=0)
    await registry.heartbeat(beat("w-live", "m"), served("m"), ttl_seconds=60)
    found: list[list[WorkerBeat]] = []
    loop = asyncio.get_running_loop()

    def reads() -> Iterator[None]:
        for _ in range(3):
            found.append(asyncio.run_coroutine_threadsafe(registry.live_workers(), loop).result())
            yield

    commands = await asyncio.to_thread(_commands_during, REDIS_URL, reads())
    assert [[w.worker_id for w in ws] for ws in found] == [["w-live"]] * 3
    assert commands, "MONITOR saw nothing: the check would prove nothing"
    assert not [c for c in commands if c.upper().startswith(("SCAN", "KEYS"))], commands


async def test_one_read_serves_the_process_for_a_moment(redis_client: Redis) -> None:
    reads = 0

    class Counting(ModelRegistry):
        async def _read(self):  # type: ignore[no-untyped-def]
            nonlocal reads
            reads += 1
            return await super()._read()

    registry = Counting(redis_client, snapshot_seconds=5)
    await asyncio.gather(*(registry.live_workers() for _ in range(20)))
    await registry.served(grace_seconds=60)
    assert reads == 1
    await registry.forget_worker("nobody")  # a change this process makes: read afresh
    await registry.live_workers()
    assert reads == 2


def test_bad_liveness_settings_are_start_up_errors_naming_them() -> None:
    for name, value in [
        ("FERRY_MAX_QUEUED_PER_MODEL", "-1"),
        ("FERRY_MODEL_GRACE_SECONDS", "-5"),
        ("FERRY_SYNC_WAIT_SECONDS", "soon"),
    ]:
        with pytest.raises(ValidationError) as info:
            ApiSettings(_env_file=None, **{name.removeprefix("FERRY_").lower(): value})  # type: ignore[arg-type]
        assert name.removeprefix("FERRY_").lower() in str(info.value)
    assert ApiSettings(models="a, b,").models == ["a", "b"]  # type: ignore[arg-type]


# -- the API in process: overload, /ready, /health ---------------------------------------


@pytest.fixture(scope="module")
def live_database() -> Iterator[str]:
    with new_database("ferry_test_liveness") as url:
        yield url


@pytest.fixture
async def sql(live_database: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_db_engine(StorageSettings(database_url=live_database))
    yield create_session_factory(engine)
    await engine.dispose()


async def _jobs(sql: async_sessionmaker[AsyncSession], model: str) -> int:
    async with sql() as session:
        return int(await session.scalar(select(func.count()).where(Job.model == model)) or 0)


async def _released(sql: async_sessionmaker[AsyncSession], job_id: str) -> None:
    """Wait until the dispatcher has sent the job out (it no longer counts as held)."""
    for _ in range(100):
        async with sql() as session:
            if await session.scalar(select(Job.enqueued_at).where(Job.id == job_id)):
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} was never released")


async def test_a_full_backlog_is_503_model_overloaded_and_stores_nothing(
    redis_client: Redis,
    live_database: str,
    sql: async_sessionmaker[AsyncSession],
    tmp_path: Path,
) -> None:
    """One engine slot (a window of one job): the first job goes out, the next two are
    held, and with FERRY_MAX_QUEUED_PER_MODEL=2 the model's backlog is then full."""
    model = "busy-model"
    with SyncRedis.from_url(REDIS_URL) as client:
        announce(client, served(model), worker=beat("busy-worker", model, concurrency=1))
    settings = ApiSettings(
        api_keys=[KEY_A, KEY_B], max_queued_per_model=2, dispatch_window_factor=1.0
    )
    async with (
        running_api(live_database, REDIS_URL, tmp_path, settings) as api,
        api.client() as http,
    ):
        first = await http.post("/v1/jobs", json=chat_body(model))
        assert first.status_code == 202
        await _released(sql, first.json()["id"])
        for _ in range(2):
            assert (await http.post("/v1/jobs", json=chat_body(model))).status_code == 202
        before = await _jobs(sql, model)
        assert before == 3
        for path, body in [
            ("/v1/jobs", chat_body(model)),
            ("/v1/chat/completions", chat_body(model)),
            ("/v1/chat/completions", chat_body(model, stream=True)),
            ("/v1/completions", {"model": model, "prompt": "Once"}),
        ]:
            response = await http.post(path, json=body)
            assert_error(response, 503, "model_overloaded")
            assert int(response.headers["Retry-After"]) > 0
        assert await _jobs(sql, model) == before
        # Another model is not held back by this one's backlog.
        other = "calm-model"
        with SyncRedis.from_url(REDIS_URL) as client:
            announce(client, served(other), worker=beat("calm-worker", other))
        assert (await http.post("/v1/jobs", json=chat_body(other))).status_code == 202


async def test_ready_waits_for_a_worker_of_each_declared_model(
    redis_client: Redis, live_database: str, sql: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    declared = "declared-model"
    settings = ApiSettings(api_keys=[KEY_A, KEY_B], models=[declared], sync_wait_seconds=0.5)
    async with (
        running_api(live_database, REDIS_URL, tmp_path, settings) as api,
        api.client(key=None) as anonymous,
        api.client() as http,
    ):
        health = await anonymous.get("/health")
        assert health.status_code == 200, health.text
        assert health.json()["workers"] == []
        ready = await anonymous.get("/ready")
        assert ready.status_code == 503
        assert ready.json()["models"] == {declared: 0}
        # Listed with no worker, accepted as a job, refused (503) when awaited.
        cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
        assert cards[declared]["live_workers"] == 0 and cards[declared]["workers"] == 0
        assert (await http.post("/v1/jobs", json=chat_body(declared))).status_code == 202
        before = await _jobs(sql, declared)
        # Every route that waits for its answer (the EAS ones pick the only model).
        for method, path, kwargs in [
            ("POST", "/v1/chat/completions", {"json": chat_body(declared)}),
            ("POST", "/v1/chat/completions", {"json": chat_body(declared, stream=True)}),
            ("POST", "/v1/completions", {"json": {"model": declared, "prompt": "Once"}}),
            ("POST", "/infer_forward", {"json": {"prompt": "Hi"}}),
            ("POST", "/", {"content": "Hello", "headers": {"Content-Type": "text/plain"}}),
        ]:
            response = await http.request(method, path, **kwargs)  # type: ignore[arg-type]
            assert_error(response, 503, "model_unavailable")
            assert int(response.headers["Retry-After"]) > 0
        assert await _jobs(sql, declared) == before
        # Neither served nor declared: 404, as any unknown model.
        assert_error(
            await http.post("/v1/jobs", json=chat_body("nobody-serves-this")),
            404,
            "model_not_found",
        )
        with SyncRedis.from_url(REDIS_URL) as client:
            announce(client, served(declared), worker=beat("late-worker", declared))
        await asyncio.sleep(0.6)  # the registry read is shared for a moment
        ready = await anonymous.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["models"] == {declared: 1}


async def test_a_synchronous_request_runs_once_a_worker_appears_within_the_wait(
    redis_client: Redis, live_database: str, sql: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    """A declared model no worker has announced: a chat completion waits, a worker
    announces it (context 2,048) meanwhile, and the job is made for it then, checked
    against that context. No worker answers here, so the wait for the answer itself
    (FERRY_SYNC_TIMEOUT_SECONDS) ends in its own 503, with the job stored."""
    declared = "scaled-from-zero"
    settings = ApiSettings(
        api_keys=[KEY_A, KEY_B],
        models=[declared],
        sync_wait_seconds=20,
        sync_timeout_seconds=0.5,
    )
    async with (
        running_api(live_database, REDIS_URL, tmp_path, settings) as api,
        api.client() as http,
    ):
        too_long = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat_body(declared, max_tokens=4096))
        )
        fits = asyncio.create_task(
            http.post("/v1/chat/completions", json=chat_body(declared, max_tokens=8))
        )
        await asyncio.sleep(1.0)
        assert not fits.done() and not too_long.done()  # waiting for a worker
        with SyncRedis.from_url(REDIS_URL) as client:
            announce(client, served(declared), worker=beat("first-worker", declared))
        assert_error(await too_long, 400, "context_length_exceeded")
        answer = await fits
        assert_error(answer, 503, "service_unavailable")  # the job's answer did not come
        assert await _jobs(sql, declared) == 1


async def test_health_is_503_naming_redis_when_redis_is_gone(
    live_database: str, tmp_path: Path
) -> None:
    """An app whose Redis stops answering: `/health` and `/ready` are 503 and say Redis
    failed, SQL still ok."""
    from tests import services

    own = services.start_redis()
    try:
        settings = ApiSettings(api_keys=[KEY_A, KEY_B])
        async with (
            running_api(live_database, own.url, tmp_path / "objects", settings) as api,
            api.client(key=None) as anonymous,
        ):
            assert (await anonymous.get("/health")).status_code == 200
            own.stop()
            for path in ("/health", "/ready"):
                response = await anonymous.get(path)
                assert response.status_code == 503, response.text
                body = response.json()
                assert body["database"] == "ok"
                assert body["redis"].startswith("error")
                assert body["status"] == "unavailable"
    finally:
        own.stop()


# -- real workers ------------------------------------------------------------------------


def check_worker(redis_url: str) -> subprocess.CompletedProcess[str]:
    """`ferry check-worker`, as a container runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "check-worker"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FERRY_REDIS_URL": redis_url},
    )


async def test_check_worker_counts_only_this_hosts_live_workers(redis_client: Redis) -> None:
    """A live beat of a worker on another host is not this container's; Redis out of reach
    is not held against the worker (exit 0, said on stderr)."""
    sync = SyncRedis.from_url(REDIS_URL)
    try:
        other = f"{socket.gethostname()}x:1:abcdef"
        announce(sync, served("tiny-elsewhere"), worker=beat(other, "tiny-elsewhere"))
        assert check_worker(REDIS_URL).returncode == 1
        mine = f"{socket.gethostname()}:2:abcdef"
        announce(sync, served("tiny-here"), worker=beat(mine, "tiny-here"), ttl_seconds=1)
        here = check_worker(REDIS_URL)
        assert here.returncode == 0 and mine in here.stdout and other not in here.stdout
        await asyncio.sleep(1.2)
        assert check_worker(REDIS_URL).returncode == 1
    finally:
        sync.close()
    unreachable = check_worker("redis://127.0.0.1:1/0")
    assert unreachable.returncode == 0
    assert "Redis cannot be reached" in unreachable.stderr


def _cards(client: httpx.Client) -> dict[str, dict[str, object]]:
    return {m["id"]: m for m in client.get("/v1/models").json()["data"]}


def test_last_worker_killed_model_leaves_and_a_declared_models_job_waits_for_its_worker(
    own_database: str, model_cache: Path, logs: Path, s3_url: str
) -> None:
    served_model, declared = "tiny-liveness", "tiny-declared"
    with open_stack(own_database, 15, model_cache, s3_url) as own:
        own.add_api(
            "live-api",
            logs,
            FERRY_MODELS=declared,
            FERRY_MODEL_GRACE_SECONDS="6",
            FERRY_SYNC_WAIT_SECONDS="1",
            FERRY_EAS_MODEL=declared,
        )
        worker = own.add_worker("live-worker", served_model, "transformers", logs)
        anonymous = httpx.Client(base_url=own.url, timeout=60)
        client = own.client()
        wait_until(lambda: _cards(client).get(served_model, {}).get("live_workers") == 1, 30, "")
        assert _cards(client)[declared]["live_workers"] == 0
        assert anonymous.get("/ready").status_code == 503
        # The EAS WebSocket, which has no status code: the 503's error as its message, then
        # <EOS>; nothing stored.
        ws = websocket.create_connection(
            own.url.replace("http://", "ws://"), header=[f"Authorization: {KEY_A}"], timeout=60
        )
        try:
            ws.send(json.dumps({"prompt": "Hello."}))
            assert json.loads(ws.recv())["error"]["code"] == "model_unavailable"
            assert ws.recv() == "<EOS>"
        finally:
            ws.close()
        assert client.get("/v1/jobs").json()["data"] == []
        # A declared model's job is accepted with no worker, and waits.
        waiting = client.post("/v1/jobs", json=chat_body(declared, "Hello.", max_tokens=4))
        assert waiting.status_code == 202, waiting.text

        # The worker's container health check (compose, the Helm chart's probes).
        alive = check_worker(own.redis_url)
        assert alive.returncode == 0, alive.stderr
        assert f"live: {socket.gethostname()}:" in alive.stdout

        worker.kill()
        killed = time.monotonic()
        # Its beat expires (3 heartbeats): still listed, with no live worker...
        wait_until(lambda: _cards(client)[served_model]["live_workers"] == 0, 30, "expiry")
        gone = check_worker(own.redis_url)
        assert gone.returncode == 1 and "no worker on" in gone.stderr, gone
        response = client.post("/v1/chat/completions", json=chat_body(served_model, "Hi."))
        assert_error(response, 503, "model_unavailable")
        assert int(response.headers["Retry-After"]) > 0
        # ...then, within its grace period, gone: 404 like any unknown model.
        wait_until(lambda: served_model not in _cards(client), 30, "grace period")
        assert time.monotonic() - killed < 30
        assert_error(
            client.post("/v1/chat/completions", json=chat_body(served_model, "Hi.")),
            404,
            "model_not_found",
        )

        assert client.get(f"/v1/jobs/{waiting.json()['id']}").json()["status"] == "queued"
        own.add_worker("declared-worker", declared, "transformers", logs)
        done = wait_job(client, waiting.json()["id"], timeout=120)
        assert done["status"] == "succeeded", done
        wait_until(lambda: anonymous.get("/ready").status_code == 200, 30, "ready")
        anonymous.close()
        client.close()
