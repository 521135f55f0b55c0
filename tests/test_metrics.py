"""`/metrics` at constant cost: job counters and histograms kept in Redis as jobs end (by
real workers and by cancels), engine gauges under vLLM's names, HTTP metrics per route.

The in-process API (its real lifespan, PostgreSQL and Redis) and a real worker runner on
the transformers engine and the tiny model; one test on the session stack's vLLM worker.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis as SyncRedis
from redis.asyncio import Redis as AsyncRedis
from sqlalchemy import event, text
from sqlalchemy.engine import Connection

from api.core.settings import ApiSettings
from storage.job_metrics import read_job_metrics, record_job_end, record_jobs_created
from storage.keys import MODELS_HASH
from storage.registry import ServedModel, now_epoch
from storage.settings import StorageSettings
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, TINY, Stack, new_database
from tests.fixtures.api import InProcessApi, running_api
from tests.helpers import chat_body, submit, wait_job
from worker.engines import build_engine
from worker.runner import JobRunner
from worker.settings import WorkerSettings

pytestmark = pytest.mark.timeout(900)

METRICS_REDIS_DB = 15  # no test stack or other module uses db 15
# Set while this test's own task scrapes (its SQL, not the API's background loops').
_watched: ContextVar[bool] = ContextVar("watched", default=False)


def samples(body: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by (name, labels)."""
    out = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(body: str, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter that has not moved yet)."""
    return samples(body).get((name, frozenset(labels.items())), 0.0)


def histogram_count(body: str, name: str, model: str) -> float:
    return value(body, f"{name}_count", model=model)


@pytest.fixture(scope="module")
def metrics_database() -> Iterator[str]:
    with new_database("ferry_test_metrics") as url:
        yield url


@pytest.fixture(scope="module")
async def api(
    metrics_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcessApi]:
    redis_url = f"{REDIS_BASE}/{METRICS_REDIS_DB}"
    with SyncRedis.from_url(redis_url) as client:
        client.flushdb()
        tiny = ServedModel(TINY, 2048, "transformers", created=now_epoch(), root=TINY)
        client.hset(MODELS_HASH, tiny.name, tiny.to_json())
    settings = ApiSettings(api_keys=[KEY_A, KEY_B], reconcile_interval_seconds=3600)
    objects = tmp_path_factory.mktemp("metrics-objects")
    async with running_api(metrics_database, redis_url, objects, settings) as app:
        yield app


@pytest.fixture(scope="module")
async def worker(api: InProcessApi, model_cache: Path) -> AsyncIterator[JobRunner]:
    """A real worker runner (claims, group commit, events, metrics) on the transformers
    engine and the tiny model; it runs the jobs a test hands it (no Celery)."""
    settings = WorkerSettings(
        model=TINY,
        engine="transformers",
        model_cache_dir=model_cache,
        max_model_len=2048,
        concurrency=4,
        heartbeat_seconds=0.2,
        torch_threads=1,
    )
    storage = StorageSettings(database_url=api.database_url, redis_url=api.redis_url)
    runner = JobRunner(settings, storage, build_engine)
    await asyncio.to_thread(runner.start)
    yield runner
    await asyncio.to_thread(runner.stop)


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


async def _insert_finished_jobs(api: InProcessApi, first: int, last: int) -> None:
    """Finished jobs straight into SQL, in one statement (no API, no Redis)."""
    async with api.app.state.ferry.db.transaction() as session:
        owner = await session.scalar(text("SELECT id FROM api_keys ORDER BY id LIMIT 1"))
        await session.execute(
            text(
                "INSERT INTO jobs (id, owner_id, model, kind, lane, status, priority, request,"
                " attempts, created_at, started_at, first_token_at, finished_at,"
                " prompt_tokens, completion_tokens, ttft_ms)"
                " SELECT 'job_bulk_' || lpad(g::text, 8, '0'), :owner, :model, 'chat',"
                " 'interactive', 'succeeded', 0, CAST('{}' AS jsonb), 1, now(), now(), now(),"
                " now(), 10, 5, 100"
                " FROM generate_series(CAST(:first AS integer), CAST(:last AS integer)) AS g"
            ),
            {"owner": owner, "model": TINY, "first": first, "last": last},
        )


async def _median_scrape_seconds(client: httpx.AsyncClient, n: int = 15) -> float:
    await scrape(client)  # warm
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await scrape(client)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


async def test_scrape_costs_the_same_with_100_and_100000_finished_jobs(
    api: InProcessApi,
) -> None:
    """No scrape reads SQL at all, and its time does not follow the jobs table's size."""
    statements: list[str] = []

    def seen(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        # Only this test's own task: the API's background loops use SQL meanwhile.
        if _watched.get():
            statements.append(statement)

    sync_engine = api.app.state.ferry.db.sessions.kw["bind"].sync_engine
    event.listen(sync_engine, "before_cursor_execute", seen)
    try:
        async with api.client() as client:
            await _insert_finished_jobs(api, 1, 100)
            watching = _watched.set(True)
            small = await _median_scrape_seconds(client)
            _watched.reset(watching)
            await _insert_finished_jobs(api, 101, 100_000)
            watching = _watched.set(True)
            large = await _median_scrape_seconds(client)
            async with api.app.state.ferry.db.read() as session:
                await session.execute(text("SELECT 'the listener sees this task'"))
            _watched.reset(watching)
    finally:
        event.remove(sync_engine, "before_cursor_execute", seen)
    assert statements == ["SELECT 'the listener sees this task'"]
    # The figure bench/README.md records (`pytest -s` shows it).
    print(f"/metrics median: {small * 1000:.2f} ms at 100 jobs, {large * 1000:.2f} ms at 100,100")
    # Generous: a whole-table aggregate over 100,000 rows alone costs many times a scrape.
    assert large < small * 3 + 0.005, (small, large)
    async with api.app.state.ferry.db.transaction() as session:
        await session.execute(text("DELETE FROM jobs WHERE id LIKE 'job_bulk_%'"))


async def test_a_workers_job_is_counted_and_survives_deleting_its_row(
    api: InProcessApi, worker: JobRunner
) -> None:
    """A real worker's job: queued then running gauges, then jobs ended, tokens and the
    three histograms move for its model; deleting the row takes nothing back."""
    async with api.client() as client:
        before = await scrape(client)
        response = await client.post(
            "/v1/jobs", json=chat_body(TINY, max_tokens=300, ignore_eos=True, temperature=0)
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        queued = await scrape(client)
        assert value(queued, "ferry_jobs_queued", model=TINY) == (
            value(before, "ferry_jobs_queued", model=TINY) + 1
        )

        run = asyncio.create_task(asyncio.to_thread(worker.run_jobs, [job_id]))
        deadline = time.monotonic() + 60
        while True:
            during = await scrape(client)
            if value(during, "ferry_jobs_running", model=TINY) == 1:
                break
            assert not run.done() and time.monotonic() < deadline, "never seen running"
            await asyncio.sleep(0.05)
        # The engine's own gauges, under vLLM's names, for this worker.
        assert (
            "vllm:num_requests_running",
            frozenset({("model_name", TINY), ("worker_id", worker.worker_id)}),
        ) in samples(during)
        assert value(during, "ferry_jobs_queued", model=TINY) == value(
            before, "ferry_jobs_queued", model=TINY
        )
        assert await run == ["succeeded"]
        final = (await client.get(f"/v1/jobs/{job_id}")).json()
        after = await scrape(client)

        usage = final["usage"]
        assert value(after, "ferry_jobs_ended_total", model=TINY, status="succeeded") == (
            value(before, "ferry_jobs_ended_total", model=TINY, status="succeeded") + 1
        )
        assert value(after, "ferry_tokens_generated_total", model=TINY) == (
            value(before, "ferry_tokens_generated_total", model=TINY) + usage["completion_tokens"]
        )
        assert value(after, "ferry_prompt_tokens_total", model=TINY) == (
            value(before, "ferry_prompt_tokens_total", model=TINY) + usage["prompt_tokens"]
        )
        for name in (
            "ferry_time_to_first_token_seconds",
            "ferry_request_queue_time_seconds",
            "ferry_e2e_request_latency_seconds",
        ):
            assert histogram_count(after, name, TINY) == histogram_count(before, name, TINY) + 1
        ttft = final["timings"]["ttft_seconds"]
        assert value(after, "ferry_time_to_first_token_seconds_sum", model=TINY) == (
            pytest.approx(
                value(before, "ferry_time_to_first_token_seconds_sum", model=TINY) + ttft,
                abs=0.01,
            )
        )
        # The running gauge follows the worker's next report (every heartbeat period).
        deadline = time.monotonic() + 10
        while value(settled := await scrape(client), "ferry_jobs_running", model=TINY) != 0:
            assert time.monotonic() < deadline, "still running"
            await asyncio.sleep(0.05)
        assert value(settled, "ferry_jobs_queued", model=TINY) == value(
            before, "ferry_jobs_queued", model=TINY
        )

        async with api.app.state.ferry.db.transaction() as session:
            await session.execute(text("DELETE FROM jobs"))
        deleted = await scrape(client)
    counters = [
        (n, labels)
        for (n, labels) in samples(after)
        if n.endswith(("_total", "_count", "_sum", "_bucket")) and not n.startswith("ferry_http")
    ]
    assert counters
    for key in counters:
        assert samples(deleted)[key] == samples(after)[key], key


async def test_a_cancel_is_counted_once(api: InProcessApi) -> None:
    async with api.client() as client:
        before = await scrape(client)
        job = (await client.post("/v1/jobs", json=chat_body(TINY))).json()
        cancelled = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        again = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409
        after = await scrape(client)
    assert value(after, "ferry_jobs_ended_total", model=TINY, status="cancelled") == (
        value(before, "ferry_jobs_ended_total", model=TINY, status="cancelled") + 1
    )
    assert value(after, "ferry_jobs_queued", model=TINY) == value(
        before, "ferry_jobs_queued", model=TINY
    )


async def test_http_requests_are_labelled_by_route_template(api: InProcessApi) -> None:
    async with api.client() as client:
        before = await scrape(client)
        for i in range(3):
            assert (await client.get(f"/v1/jobs/job_missing{i}")).status_code == 404
        assert (await client.get("/no/such/path")).status_code == 404
        too_big = await client.post("/v1/chat/completions", content=b"x" * (17 * 1024 * 1024))
        assert too_big.status_code == 413
        after = await scrape(client)
    route = {"route": "/v1/jobs/{job_id}", "method": "GET", "status": "404"}
    assert value(after, "ferry_http_requests_total", **route) == (
        value(before, "ferry_http_requests_total", **route) + 3
    )
    assert not any("job_missing" in str(labels) for _, labels in samples(after))
    assert (
        value(after, "ferry_http_requests_total", route="<unmatched>", method="GET", status="404")
        == value(
            before, "ferry_http_requests_total", route="<unmatched>", method="GET", status="404"
        )
        + 1
    )
    # Refused before routing, still counted under the route it was for.
    big = {"route": "/v1/chat/completions", "method": "POST", "status": "413"}
    assert value(after, "ferry_http_requests_total", **big) >= 1
    duration = {"route": "/v1/jobs/{job_id}", "method": "GET"}
    assert value(after, "ferry_http_request_duration_seconds_count", **duration) == (
        value(before, "ferry_http_request_duration_seconds_count", **duration) + 3
    )


def test_a_live_vllm_worker_reports_vllm_gauges(stack: Stack) -> None:
    """The session stack's vLLM worker: its engine gauges under vLLM's names and labels,
    through Redis, on every API replica alike; a job it runs is counted."""
    with stack.client() as client:
        job = submit(client, chat_body(TINY, max_tokens=8, temperature=0))
        assert wait_job(client, job["id"])["status"] == "succeeded"
    pages = [httpx.get(f"{url}/metrics", timeout=30).text for url in stack.api_urls]
    for page in pages:
        names = {(name, dict(labels).get("model_name")) for name, labels in samples(page)}
        for gauge in (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
        ):
            assert (gauge, TINY) in names, gauge
        assert value(page, "ferry_jobs_ended_total", model=TINY, status="succeeded") >= 1
    # Cluster-wide: both replicas export the same job counters.
    assert [value(p, "ferry_jobs_ended_total", model=TINY, status="succeeded") for p in pages] == [
        value(pages[0], "ferry_jobs_ended_total", model=TINY, status="succeeded")
    ] * len(pages)


async def test_record_job_end_in_a_callers_pipeline(api: InProcessApi) -> None:
    """What other ends (an expiry) call: queued in the caller's pipeline, written with it;
    an end whose acceptance was never counted leaves the open count at zero, not below."""
    model = "ferry-metrics-unit"
    redis = AsyncRedis.from_url(api.redis_url)
    try:
        await record_jobs_created(redis, {model: 1})
        pipe = redis.pipeline(transaction=True)
        await record_job_end(pipe, model, "expired", None, None, None, 2.5, 2.5)
        await record_job_end(pipe, model, "expired", None, None, None, 7000.0, 7000.0)
        assert (await read_job_metrics(redis)).jobs_ended.get((model, "expired")) is None
        await pipe.execute()
        metrics = await read_job_metrics(redis)
    finally:
        await redis.aclose()
    assert metrics.jobs_ended[(model, "expired")] == 2
    assert metrics.jobs_open[model] == 0
    queue = metrics.histograms["ferry_request_queue_time_seconds"][model]
    assert dict(queue.buckets)["2.5"] == 1 and dict(queue.buckets)["5.0"] == 1
    assert dict(queue.buckets)["+Inf"] == 2 and queue.total == 7002.5
    assert model not in metrics.histograms["ferry_time_to_first_token_seconds"]
