"""Async Ferry clients for benchmarks: submit a job, follow its SSE stream to the end.

aiohttp rather than httpx + httpx-sse: the benchmarks run their clients on the machine
they measure, and on a 2-core machine httpx's per-chunk overhead took more CPU than
Ferry's API process did for the same streams (`bench/pipeline.py` prints the CPU each
process used).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp


@dataclass
class StreamResult:
    job_id: str
    completion_tokens: int = 0
    text: str = ""
    # Engine-emit -> client-receive delay of each delta, seconds.
    delays: list[float] = field(default_factory=list)
    finished_at: float = 0.0


@contextlib.asynccontextmanager
async def bench_client(url: str, key: str) -> AsyncIterator[aiohttp.ClientSession]:
    """A session for `submit_and_follow`: no connection limit, long timeouts."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        base_url=url,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=600),
        headers={"Authorization": f"Bearer {key}"},
    ) as session:
        yield session


@dataclass
class Sse:
    event: str = "message"
    data: str = ""
    id: str | None = None


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[Sse]:
    """Events of a text/event-stream body (comments skipped), per the WHATWG rules that
    Ferry's streams use: `field: value` lines, a blank line ends an event."""
    current, data = Sse(), list[str]()
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                current.data = "\n".join(data)
                yield current
            current, data = Sse(), []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            current.event = value
        elif name == "id":
            current.id = value


async def submit_and_follow(client: aiohttp.ClientSession, body: dict[str, object]) -> StreamResult:
    async with client.post("/v1/jobs", json=body) as response:
        response.raise_for_status()
        result = StreamResult((await response.json())["id"])
    return await follow(client, result)


async def follow(client: aiohttp.ClientSession, result: StreamResult) -> StreamResult:
    """Read the job's SSE stream to its end into `result`."""
    async with client.get(f"/v1/jobs/{result.job_id}/events") as response:
        response.raise_for_status()
        async for sse in sse_events(response):
            received = time.time()
            data = json.loads(sse.data)
            if sse.event == "delta":
                result.text += data["text"]
                if "ts" in data:
                    result.delays.append(received - data["ts"])
            elif sse.event == "usage":
                result.completion_tokens = data["completion_tokens"]
            elif sse.event in ("done", "error", "cancelled"):
                if sse.event != "done":
                    raise RuntimeError(f"job {result.job_id} ended with {sse.event}: {data}")
                break
    result.finished_at = time.perf_counter()
    return result


# Warm-up jobs' length: enough to go through the whole path, short enough to cost little.
WARM_TOKENS = 4


def warm_prompts(n: int) -> list[str]:
    """Prompts no measured run uses (so nothing it measures is already in a cache)."""
    return [f"Say hello to visitor {i}." for i in range(n)]


async def warm_up(client: aiohttp.ClientSession, model: str, n: int) -> None:
    """A burst of `n` short jobs, so that a measured burst of `n` finds a warm service:
    connections open (client, API's database and Redis pools), worker threads started,
    the engine past its first steps."""
    await asyncio.gather(
        *(
            submit_and_follow(
                client,
                {
                    "model": model,
                    "max_tokens": WARM_TOKENS,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": text}],
                },
            )
            for text in warm_prompts(n)
        )
    )
