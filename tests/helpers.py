"""Small client-side helpers shared by the end-to-end tests."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from httpx_sse import connect_sse
from redis.asyncio import Redis

from storage.broker import priority_lists
from storage.keys import RUN_JOBS_TASK
from worker.engines import build_engine
from worker.engines.base import Delta, Engine, GenerationRequest
from worker.settings import WorkerSettings

TERMINAL = {"done", "error", "cancelled", "expired"}


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]

    @property
    def order(self) -> tuple[int, int]:
        attempt, seq = self.id.split("-")
        return int(attempt), int(seq)


def chat_body(model: str, content: str = "Tell me a story.", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled", "expired"):
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} did not finish")


def read_events(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: str | None = None,
    limit: int | None = None,
) -> list[Event]:
    """Read the job's SSE stream until its terminal event (or `limit` events)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[Event] = []
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        assert source.response.status_code == 200, source.response.read()
        for sse in source.iter_sse():
            if not sse.event and not sse.data:  # a keep-alive comment
                continue
            events.append(Event(sse.id, sse.event, json.loads(sse.data)))
            if sse.event in TERMINAL or (limit is not None and len(events) >= limit):
                break
    return events


def text_of(events: list[Event]) -> str:
    """The output text, honouring `retry` (a new attempt starts the text over)."""
    text = ""
    for event in events:
        if event.type == "retry":
            text = ""
        elif event.type == "delta":
            text += event.data["text"]
    return text


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@contextlib.asynccontextmanager
async def running_engine(
    model: str, engine: str, model_cache: Path, max_model_len: int
) -> AsyncIterator[Engine]:
    """One real engine on a tiny model, started and stopped around the block."""
    settings = WorkerSettings(
        model=model,
        engine=engine,
        model_cache_dir=model_cache,
        max_model_len=max_model_len,
        concurrency=16,
        cpu_kv_cache_gib=1,
    )
    eng = build_engine(settings)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.stop()


async def abort_after_first_delta(engine: Engine, request: GenerationRequest) -> list[Delta]:
    """Generate, abort the request as soon as its first delta arrives; every delta seen."""
    deltas: list[Delta] = []
    async for delta in engine.generate(request):
        deltas.append(delta)
        if len(deltas) == 1:
            await engine.abort(request.request_id)
    return deltas


@contextlib.asynccontextmanager
async def empty_redis_db(url: str) -> AsyncIterator[Redis]:
    """A client on a Redis db (one no test stack uses) emptied before and after."""
    client = Redis.from_url(url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


def sent_job_ids(client: redis.Redis, queue: str) -> list[str]:
    """Job ids in the Celery messages waiting on `queue` (every priority list); each
    message is the one task, its one argument the list of its jobs' ids."""
    ids: list[str] = []
    for name in priority_lists(queue):
        for raw in client.lrange(name, 0, -1):
            message = json.loads(raw)
            assert message["headers"]["task"] == RUN_JOBS_TASK
            (job_ids,) = json.loads(base64.b64decode(message["body"]))[0]
            ids.extend(job_ids)
    return ids
