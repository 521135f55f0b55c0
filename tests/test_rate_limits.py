"""Per-key limits (api/core/ratelimit.py, storage/ratelimit.py): two API apps in this
process sharing one PostgreSQL database and one Redis, as two replicas would; no worker
(accepted jobs stay queued). Where a test counts exactly, both apps' limiters read one
frozen clock, so that no budget refills while the requests race."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import websocket
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from sqlalchemy import func, select

from api.core.ratelimit import reset_text
from api.core.settings import ApiSettings
from ferry_testing.procs import free_port
from storage.models import Batch, BatchLineError, Job, JobStatus
from storage.ratelimit import Limits, RateLimiter, unused_tokens
from storage.registry import ServedModel, WorkerBeat, announce, now_epoch
from storage.repositories import api_keys
from storage.settings import StorageSettings
from tests.conftest import REDIS_BASE, TINY, new_database
from tests.fixtures.api import InProcessApi, running_api
from tests.imaging import data_url, image_bytes
from worker.engines.base import Delta, GenerationRequest, ModelInfo
from worker.runner import JobRunner
from worker.settings import WorkerSettings

LIMITS_REDIS_DB = 6  # no test stack or other module uses db 6
FROZEN = 1_800_000_000.0


@dataclass
class Replicas:
    apps: list[InProcessApi]
    redis_url: str

    def freeze(self, at: float | None = FROZEN) -> None:
        for api in self.apps:
            api.app.state.ferry.limiter.clock = None if at is None else (lambda: at)

    async def key(self, **limits: int) -> tuple[str, str]:
        """A new API key with these limits: (its token, its id)."""
        token = "sk-limits-" + secrets.token_hex(8)
        async with self.apps[0].app.state.ferry.db.transaction() as session:
            [row] = await api_keys.ensure_keys(session, [token])
            # Made as the admin API makes them (an env key is revoked at a restart
            # whose FERRY_API_KEYS does not list it).
            row.source = "admin"
            row.limits = limits
        return token, row.id

    def client(self, token: str, index: int = 0) -> httpx.AsyncClient:
        return self.apps[index].client(token)

    async def count(self, model: Any, owner: str) -> int:
        async with self.apps[0].app.state.ferry.db.read() as session:
            query = select(func.count()).select_from(model).where(model.owner_id == owner)
            return int(await session.scalar(query) or 0)


@pytest.fixture(scope="module")
def limits_database() -> Iterator[str]:
    with new_database("ferry_test_limits") as url:
        yield url


@pytest.fixture(scope="module")
async def replicas(
    limits_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Replicas]:
    redis_url = f"{REDIS_BASE}/{LIMITS_REDIS_DB}"
    with SyncRedis.from_url(redis_url) as client:
        client.flushdb()
        tiny = ServedModel(
            TINY,
            2048,
            "vllm",
            supports_structured_output=True,
            supports_images=True,
            created=now_epoch(),
            root=TINY,
        )
        # ...with a live worker (no process): synchronous routes do not wait for one.
        announce(client, tiny, worker=WorkerBeat("limits", TINY, "vllm", 0, time.time()))
    objects = tmp_path_factory.mktemp("limits-objects")
    settings = ApiSettings(api_keys=["sk-limits-boot"], reconcile_interval_seconds=3600)
    async with (
        running_api(limits_database, redis_url, objects, settings) as first,
        running_api(limits_database, redis_url, objects, settings) as second,
    ):
        yield Replicas([first, second], redis_url)


def chat(content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": content}], **extra}


def assert_429(response: httpx.Response, kind: str) -> dict[str, Any]:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == kind
    assert error["code"] == "rate_limit_exceeded"
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return dict(error)


# -- storage/ratelimit.py on real Redis -----------------------------------------------------


@pytest.fixture
async def limiter_redis() -> AsyncIterator[Redis]:
    """The module's Redis db (not emptied: the replicas' registry lives there too; each
    test's key is new)."""
    client = Redis.from_url(f"{REDIS_BASE}/{LIMITS_REDIS_DB}")
    yield client
    await client.aclose()


async def test_bucket_takes_both_or_nothing_refills_and_takes_settlement(
    limiter_redis: Redis,
) -> None:
    now = [FROZEN]
    limiter = RateLimiter(limiter_redis, clock=lambda: now[0])
    limits = Limits(requests_per_minute=10, tokens_per_minute=1000)
    k = "unit-" + secrets.token_hex(4)
    first = await limiter.take(k, limits, tokens=700)
    assert first.taken and first.remaining_requests == 9 and first.remaining_tokens == 300
    # 30% of a minute to be full again: 18 s.
    assert first.reset_tokens_ms == 42_000 and first.reset_requests_ms == 6000
    # Short of tokens: nothing taken, the request included.
    refused = await limiter.take(k, limits, tokens=400)
    assert not refused.taken and refused.short == "tokens"
    assert refused.remaining_requests == 9 and refused.remaining_tokens == 300
    assert refused.retry_ms == 6000  # 100 tokens at 1000/min
    # The job used 200 of its 700: 500 come back (settlement).
    await limiter.give_back(k, unused_tokens(700, 150, 50))
    second = await limiter.take(k, limits, tokens=800)
    assert second.taken and second.remaining_tokens == 0 and second.remaining_requests == 8
    # Refill: 6 s is a tenth of a minute.
    now[0] += 6
    third = await limiter.take(k, limits, tokens=100)
    assert third.taken and third.remaining_tokens == 0 and third.remaining_requests == 8
    # Giving back never fills past the limit.
    await limiter.give_back(k, 10_000, requests=50)
    full = await limiter.take(k, limits, tokens=0)
    assert full.remaining_tokens == 1000 and full.remaining_requests == 9
    # Larger than the limit itself: never, and said so.
    huge = await limiter.take(k, limits, tokens=1001)
    assert not huge.taken and huge.retry_ms is None
    # Idle keys vanish: the hash expires once it would be full anyway.
    ttl = await limiter_redis.pttl(f"ferry:ratelimit:{{{k}}}")
    assert 0 < ttl <= 60_000


async def test_requests_bucket_and_daily_lines(limiter_redis: Redis) -> None:
    limiter = RateLimiter(limiter_redis, clock=lambda: FROZEN)
    limits = Limits(requests_per_minute=2, batch_lines_per_day=10)
    k = "unit-" + secrets.token_hex(4)
    assert (await limiter.take(k, limits, lines=6)).taken
    over = await limiter.take(k, limits, lines=5)
    assert not over.taken and over.short == "lines" and over.lines_used == 6
    assert over.retry_ms is not None and over.retry_ms == over.reset_lines_ms
    assert (await limiter.take(k, limits, lines=4)).taken
    refused = await limiter.take(k, limits, lines=0)
    assert not refused.taken and refused.short == "requests" and refused.retry_ms == 30_000
    # A give-back of lines and a request (a batch that was then not created).
    await limiter.give_back(k, requests=1, lines=4)
    assert (await limiter.take(k, limits, lines=4)).taken


def test_reset_is_written_as_openai_writes_it() -> None:
    assert reset_text(20) == "20ms"
    assert reset_text(1000) == "1s"
    assert reset_text(1500) == "1.5s"
    assert reset_text(360_000) == "6m0s"
    assert reset_text(3_723_000) == "1h2m3s"


# -- the routes -----------------------------------------------------------------------------


async def test_200_racing_requests_on_two_replicas_get_exactly_the_limit(
    replicas: Replicas,
) -> None:
    replicas.freeze()
    token, owner = await replicas.key(requests_per_minute=50)
    clients = [replicas.client(token, 0), replicas.client(token, 1)]
    try:
        answers = await asyncio.gather(
            *(clients[i % 2].post("/v1/jobs", json=chat(f"race {i}")) for i in range(200))
        )
    finally:
        for client in clients:
            await client.aclose()
    accepted = [r for r in answers if r.status_code == 202]
    refused = [r for r in answers if r.status_code != 202]
    assert len(accepted) == 50
    assert await replicas.count(Job, owner) == 50
    # Each accepted answer saw its own place in the budget: the takes were atomic.
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in accepted)
    assert remaining == list(range(50))
    for response in accepted:
        assert response.headers["x-ratelimit-limit-requests"] == "50"
        assert "x-ratelimit-limit-tokens" not in response.headers  # no such limit
    for response in refused:
        assert_429(response, "requests")
        assert response.headers["x-ratelimit-limit-requests"] == "50"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert response.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert response.headers["Retry-After"] == "2"  # 1.2 s to the next request


async def test_tokens_per_minute_refusal_takes_nothing(replicas: Replicas) -> None:
    replicas.freeze()
    token, owner = await replicas.key(requests_per_minute=100, tokens_per_minute=1000)
    async with replicas.client(token) as client:
        first = await client.post("/v1/jobs", json=chat("Hi", max_tokens=600))
        assert first.status_code == 202, first.text
        spent = 1000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert spent == 600 + 4 + 1  # max_tokens + a message + "Hi" (2 bytes / 3, up)
        assert first.headers["x-ratelimit-remaining-requests"] == "99"
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        over = await client.post("/v1/jobs", json=chat("Hi", max_tokens=600))
        error = assert_429(over, "tokens")
        assert "tokens per minute" in error["message"]
        assert over.headers["x-ratelimit-remaining-tokens"] == str(1000 - spent)
        assert over.headers["x-ratelimit-remaining-requests"] == "99"  # not taken either
        # 205 tokens short at 1000/min: 12.3 s.
        assert over.headers["Retry-After"] == "13"
        fits = await client.post("/v1/jobs", json=chat("Hi", max_tokens=300))
        assert fits.status_code == 202
        assert fits.headers["x-ratelimit-remaining-tokens"] == str(1000 - spent - 305)
        assert fits.headers["x-ratelimit-remaining-requests"] == "98"
        # Larger than the limit itself.
        huge = await client.post("/v1/jobs", json=chat("Hi", max_tokens=2000))
        assert "Request too large" in assert_429(huge, "tokens")["message"]
    assert await replicas.count(Job, owner) == 2
    async with replicas.apps[0].app.state.ferry.db.read() as session:
        reserved = sorted(
            (await session.scalars(select(Job.reserved_tokens).where(Job.owner_id == owner))).all()
        )
    assert reserved == [305, spent]


async def test_remaining_decreases_and_every_work_route_counts(replicas: Replicas) -> None:
    """Every route that creates work shares one budget; a request refused with a 400 after
    the check gets its charge back. (A chat or EAS answer that was accepted would wait for
    a worker: here they are only seen refused.)"""
    replicas.freeze()
    token, owner = await replicas.key(requests_per_minute=4, tokens_per_minute=100_000)
    async with replicas.client(token) as client:
        seen = []
        for _ in range(2):
            response = await client.post("/v1/jobs", json=chat())
            seen.append(int(response.headers["x-ratelimit-remaining-requests"]))
            assert "x-ratelimit-reset-tokens" in response.headers
        # n=2 is refused by /v1/jobs after the limit was taken: the charge comes back.
        assert (await client.post("/v1/jobs", json=chat(n=2))).status_code == 400
        for _ in range(2):
            response = await client.post("/v1/jobs", json=chat())
            seen.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert seen == [3, 2, 1, 0]
        refused = [
            await client.post("/v1/chat/completions", json=chat()),
            await client.post("/v1/chat/completions", json=chat(stream=True)),
            await client.post("/v1/completions", json={"model": TINY, "prompt": "Once"}),
            await client.post("/infer_forward", json={"prompt": "Hi"}),
            await client.post("/", content="Hello", headers={"Content-Type": "text/plain"}),
        ]
        for response in refused:
            assert_429(response, "requests")
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert await replicas.count(Job, owner) == 4


def _stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_refused_request_stores_no_image_and_no_job(replicas: Replicas) -> None:
    replicas.freeze()
    token, owner = await replicas.key(requests_per_minute=1)
    picture = data_url(image_bytes(size=(32, 32)))
    body = {
        "model": TINY,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": picture}},
                ],
            }
        ],
    }
    objects = Path(replicas.apps[0].object_dir)
    async with replicas.client(token) as client:
        assert (await client.post("/v1/jobs", json=chat())).status_code == 202
        before = _stored_files(objects)
        assert_429(await client.post("/v1/jobs", json=body), "requests")
    assert _stored_files(objects) == before
    assert await replicas.count(Job, owner) == 1


async def test_max_priority_refuses_above_and_defaults_to_the_ceiling(
    replicas: Replicas,
) -> None:
    token, owner = await replicas.key(max_priority=5)
    async with replicas.client(token) as client:
        urgent = await client.post("/v1/jobs", json=chat(priority=2))
        assert urgent.status_code == 400
        error = urgent.json()["error"]
        assert error["param"] == "priority" and "max_priority is 5" in error["message"]
        assert await replicas.count(Job, owner) == 0
        unnamed = await client.post("/v1/jobs", json=chat())
        assert unnamed.status_code == 202 and unnamed.json()["priority"] == 5
        lower = await client.post("/v1/jobs", json=chat(priority=8))
        assert lower.status_code == 202 and lower.json()["priority"] == 8
        assert (await client.post("/v1/jobs", json=chat(priority=5))).status_code == 202


async def test_max_queued_jobs_429_on_synchronous_routes_only(replicas: Replicas) -> None:
    token, owner = await replicas.key(max_queued_jobs=2)
    async with replicas.client(token) as client:
        for _ in range(2):
            assert (await client.post("/v1/jobs", json=chat())).status_code == 202
        sync = await client.post("/v1/chat/completions", json=chat())
        error = assert_429(sync, "queued_jobs")
        assert sync.headers["Retry-After"] == "1"
        assert "max_queued_jobs" in error["message"]
        eas = await client.post("/", content="Hello", headers={"Content-Type": "text/plain"})
        assert_429(eas, "queued_jobs")
        assert await replicas.count(Job, owner) == 2
        # The job API still accepts: those jobs wait their turn.
        assert (await client.post("/v1/jobs", json=chat())).status_code == 202
    assert await replicas.count(Job, owner) == 3


async def test_batch_lines_per_day(replicas: Replicas) -> None:
    token, owner = await replicas.key(batch_lines_per_day=5, requests_per_minute=100)
    lines = [
        json.dumps(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": chat()}
        )
        for i in range(3)
    ]
    async with replicas.client(token) as client:
        upload = await client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", "\n".join(lines).encode(), "application/jsonl")},
        )
        assert upload.status_code == 200, upload.text
        create = {
            "input_file_id": upload.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        first = await client.post("/v1/batches", json=create)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-requests"] == "100"
        second = await client.post("/v1/batches", json=create)
        error = assert_429(second, "batch_lines")
        assert "limit 5, 2 left today" in error["message"]
        # The creation request itself was given back with the rest.
        after = await client.post("/v1/jobs", json=chat())
        assert int(after.headers["x-ratelimit-remaining-requests"]) >= 97
    assert await replicas.count(Batch, owner) == 1


async def test_cancelled_queued_job_gives_its_tokens_back(replicas: Replicas) -> None:
    replicas.freeze()
    token, _ = await replicas.key(tokens_per_minute=2000)
    async with replicas.client(token) as client:
        job = await client.post("/v1/jobs", json=chat("Hi", max_tokens=1500))
        assert job.headers["x-ratelimit-remaining-tokens"] == str(2000 - 1505)
        assert_429(await client.post("/v1/jobs", json=chat("Hi", max_tokens=1500)), "tokens")
        cancelled = await client.post(f"/v1/jobs/{job.json()['id']}/cancel")
        assert cancelled.json()["status"] == JobStatus.CANCELLED
        again = await client.post("/v1/jobs", json=chat("Hi", max_tokens=1500))
        assert again.status_code == 202
        assert again.headers["x-ratelimit-remaining-tokens"] == str(2000 - 1505)


async def test_expired_queued_job_gives_its_tokens_back(replicas: Replicas) -> None:
    """Settled as a cancel is: the expiry sweep gives back what the job reserved."""
    replicas.freeze()
    token, _ = await replicas.key(tokens_per_minute=2000)
    async with replicas.client(token) as client:
        job = await client.post("/v1/jobs", json=chat("Hi", max_tokens=1500, deadline_seconds=0.3))
        assert job.headers["x-ratelimit-remaining-tokens"] == str(2000 - 1505)
        assert_429(await client.post("/v1/jobs", json=chat("Hi", max_tokens=1500)), "tokens")
        await client.get(f"/v1/jobs/{job.json()['id']}/events")  # ends once it has expired
        expired = await client.get(f"/v1/jobs/{job.json()['id']}")
        assert expired.json()["status"] == JobStatus.EXPIRED
        again = await client.post("/v1/jobs", json=chat("Hi", max_tokens=1500))
        assert again.status_code == 202, again.text
        assert again.headers["x-ratelimit-remaining-tokens"] == str(2000 - 1505)


async def test_openapi_declares_429_with_the_headers(replicas: Replicas) -> None:
    async with replicas.client("unused") as client:
        document = (await client.get("/openapi.json")).json()
    for path, accepted in [
        ("/v1/jobs", "202"),
        ("/v1/chat/completions", "200"),
        ("/v1/completions", "200"),
        ("/v1/batches", "200"),
        ("/infer_forward", "200"),
        ("/", "200"),
    ]:
        responses = document["paths"][path]["post"]["responses"]
        assert "Retry-After" in responses["429"]["headers"]
        assert "x-ratelimit-remaining-tokens" in responses["429"]["headers"]
        assert "x-ratelimit-remaining-requests" in responses[accepted]["headers"]


async def test_websocket_message_over_the_limit_gets_an_error_message(
    replicas: Replicas,
) -> None:
    """A WebSocket has no status: each message over the limit is answered with the 429's
    error (then `<EOS>` when streamed), and the connection stays open."""
    replicas.freeze()
    token, owner = await replicas.key(requests_per_minute=1)
    async with replicas.client(token) as client:
        assert (await client.post("/v1/jobs", json=chat())).status_code == 202
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            replicas.apps[0].app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"
        )
    )
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
            await asyncio.sleep(0.05)

        def rounds() -> list[str]:
            ws = websocket.create_connection(
                f"ws://127.0.0.1:{port}/", header=[f"Authorization: {token}"], timeout=30
            )
            try:
                ws.send(json.dumps({"prompt": "Hi"}))
                streamed = [ws.recv(), ws.recv()]
                ws.send(json.dumps({"prompt": "Hi", "use_stream_chat": False}))
                return [*streamed, ws.recv()]
            finally:
                ws.close()

        first, eos, unstreamed = await asyncio.to_thread(rounds)
    finally:
        server.should_exit = True
        await serving
    for message in (first, unstreamed):
        error = json.loads(message)["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert eos == "<EOS>"
    assert await replicas.count(Job, owner) == 1


class _CountingEngine:
    """An engine that answers at once with a known usage: 10 prompt + 5 completion tokens.
    (The worker around it, its group commit and its settlement are the real ones.)"""

    info = ModelInfo(TINY, 2048, "vllm", supports_images=True, supports_structured_output=True)
    tokenizer = None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        yield Delta("Hello", 5, prompt_tokens=10, finish_reason="stop")

    async def abort(self, request_id: str) -> None:
        return None


@pytest.fixture
async def counting_worker(replicas: Replicas) -> AsyncIterator[JobRunner]:
    """A real worker runner (claims, group commit, events, settlement) on the counting
    engine; it runs the jobs a test hands it (no Celery)."""
    runner = JobRunner(
        WorkerSettings(served_model_name=TINY),
        StorageSettings(database_url=replicas.apps[0].database_url, redis_url=replicas.redis_url),
        lambda _: _CountingEngine(),
    )
    await asyncio.to_thread(runner.start)
    yield runner
    await asyncio.to_thread(runner.stop)


async def test_worker_settles_a_finished_job(
    replicas: Replicas, counting_worker: JobRunner
) -> None:
    """A real clock on both sides (the worker's give-back reads Redis's): a 3,000 tokens/min
    budget refills 50 tokens a second, so only the settlement can bring it near full
    within the test."""
    replicas.freeze(None)
    token, owner = await replicas.key(tokens_per_minute=3000)
    async with replicas.client(token) as client:
        started = time.monotonic()
        job = await client.post("/v1/jobs", json=chat("Hi", max_tokens=2000))
        assert int(job.headers["x-ratelimit-remaining-tokens"]) < 1100  # 2,005 reserved
        outcome = await asyncio.to_thread(counting_worker.run_jobs, [job.json()["id"]])
        assert outcome == ["succeeded"]
        after = await client.post("/v1/jobs", json=chat("Hi", max_tokens=1))
        elapsed = time.monotonic() - started
    # 2,005 - 15 came back: without them at most 995 + 50/s would be left.
    assert elapsed < 30
    assert int(after.headers["x-ratelimit-remaining-tokens"]) > 995 + 50 * elapsed + 1000
    assert await replicas.count(Job, owner) == 2


async def test_eas_answer_carries_the_headers_and_the_ceiling(
    replicas: Replicas, counting_worker: JobRunner
) -> None:
    """A synchronous route's answer carries the headers; an EAS job, which names no
    priority, runs at the key's ceiling."""
    replicas.freeze(None)
    token, owner = await replicas.key(max_priority=4, requests_per_minute=10)
    async with replicas.client(token) as client:
        answer = asyncio.create_task(
            client.post("/", content="Hello", headers={"Content-Type": "text/plain"})
        )
        deadline = time.monotonic() + 20
        while not (queued := await _job_ids(replicas, owner)):
            assert time.monotonic() < deadline, "no job was stored"
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(counting_worker.run_jobs, queued) == ["succeeded"]
        response = await answer
    assert response.status_code == 200, response.text
    assert response.json()["response"] == "Hello"
    assert response.headers["x-ratelimit-limit-requests"] == "10"
    assert response.headers["x-ratelimit-remaining-requests"] == "9"
    async with replicas.apps[0].app.state.ferry.db.read() as session:
        assert await session.scalar(select(Job.priority).where(Job.id == queued[0])) == 4


async def _job_ids(replicas: Replicas, owner: str) -> list[str]:
    async with replicas.apps[0].app.state.ferry.db.read() as session:
        return list((await session.scalars(select(Job.id).where(Job.owner_id == owner))).all())


async def test_batch_lines_take_the_priority_ceiling(replicas: Replicas) -> None:
    """A line naming a more urgent priority than max_priority goes to the error file; a
    line naming none gets the ceiling."""
    token, owner = await replicas.key(max_priority=5)
    lines = [
        {"custom_id": "plain", "body": chat()},
        {"custom_id": "urgent", "body": chat(priority=2)},
        {"custom_id": "patient", "body": chat(priority=7)},
    ]
    data = "\n".join(
        json.dumps({"method": "POST", "url": "/v1/chat/completions", **line}) for line in lines
    )
    async with replicas.client(token) as client:
        upload = await client.post(
            "/v1/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", data.encode(), "application/jsonl")},
        )
        created = await client.post(
            "/v1/batches",
            json={
                "input_file_id": upload.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        )
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]
        deadline = time.monotonic() + 30
        while (await client.get(f"/v1/batches/{batch_id}")).json()["status"] == "validating":
            assert time.monotonic() < deadline, "the batch was not expanded"
            await asyncio.sleep(0.1)
    async with replicas.apps[0].app.state.ferry.db.read() as session:
        rows = await session.execute(
            select(Job.custom_id, Job.priority).where(Job.batch_id == batch_id)
        )
        priorities = dict(rows.tuples().all())
        errors = (
            await session.execute(
                select(BatchLineError.custom_id, BatchLineError.code).where(
                    BatchLineError.batch_id == batch_id
                )
            )
        ).all()
    assert priorities == {"plain": 5, "patient": 7}
    assert [tuple(e) for e in errors] == [("urgent", "priority_above_limit")]
    assert await replicas.count(Job, owner) == 2


async def test_racing_requests_on_redis_time_stay_within_the_limit(replicas: Replicas) -> None:
    """The same race on Redis's own clock: the budget refills 1 request per 1.2 s while
    it runs, never more."""
    replicas.freeze(None)
    token, owner = await replicas.key(requests_per_minute=50)
    clients = [replicas.client(token, 0), replicas.client(token, 1)]
    started = time.monotonic()
    try:
        answers = await asyncio.gather(
            *(clients[i % 2].post("/v1/jobs", json=chat(f"race {i}")) for i in range(200))
        )
    finally:
        elapsed = time.monotonic() - started
        for client in clients:
            await client.aclose()
    accepted = sum(r.status_code == 202 for r in answers)
    assert 50 <= accepted <= 50 + int(elapsed / 1.2) + 1
    assert await replicas.count(Job, owner) == accepted
    assert all(r.status_code in (202, 429) for r in answers)
