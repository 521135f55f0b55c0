"""Delay from the engine yielding a delta to the SSE client receiving it, 64 streams.

Targets (issue 2): p50 <= 2 ms, p99 <= 10 ms. Each delta event carries `ts`, the time the
worker's runner got it from the engine; the client notes when the event arrives. Worker,
API, Redis and the clients share this machine's clock (and its 2 cores).

To say which hop the time goes to, this process also subscribes to every job's Redis
channel itself (as the API's hub does) and prints the delay to that point too: engine ->
Redis subscriber is the worker's share (runner, publisher, Redis), the rest is the API's
(hub, SSE) and the client's. It also prints the CPU each process used meanwhile.

    .venv/bin/python bench/stream_latency.py [--streams 64] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from redis.asyncio import Redis

from bench.cpu import CpuSplit
from bench.sse_clients import bench_client, submit_and_follow, warm_up
from bench.stack import KEY, bench_logs, bench_stack, percentile
from storage.events import EventType, JobEvent
from storage.keys import job_channel

MODEL = "ferry-tiny-chat"


@contextlib.asynccontextmanager
async def redis_delays(redis_url: str) -> AsyncIterator[list[float]]:
    """Engine -> Redis subscriber delay of every delta published while the context is open."""
    delays: list[float] = []
    redis = Redis.from_url(redis_url, protocol=2)  # as the API's hub (api/app.py)
    pubsub = redis.pubsub()
    await pubsub.psubscribe(job_channel("*"))

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            received = time.time()
            event = JobEvent.from_json(message["data"])
            if event.type == EventType.DELTA and "ts" in event.data:
                delays.append(received - event.data["ts"])

    reader = asyncio.create_task(read())
    try:
        yield delays
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await redis.aclose()


async def run(
    url: str, redis_url: str, streams: int, max_tokens: int, cpu: CpuSplit
) -> tuple[list[float], list[float]]:
    async with bench_client(url, KEY) as client, redis_delays(redis_url) as at_redis:

        def body(i: int) -> dict[str, object]:
            return {
                "model": MODEL,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": f"Tell story number {i}."}],
            }

        await warm_up(client, MODEL, streams)  # as bench/pipeline.py does
        at_redis.clear()
        with cpu:
            results = await asyncio.gather(
                *(submit_and_follow(client, body(i)) for i in range(streams))
            )
        return [d for r in results for d in r.delays], list(at_redis)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engine", default="vllm")
    args = parser.parse_args()
    with bench_stack(bench_logs()) as stack:
        url = stack.add_api("api")
        stack.add_worker(MODEL, args.engine)
        cpu = CpuSplit()
        delays, at_redis = asyncio.run(
            run(url, stack.env["FERRY_REDIS_URL"], args.streams, args.max_tokens, cpu)
        )
    print(
        f"stream_latency: {len(delays)} deltas over {args.streams} streams ({args.engine} engine)"
    )
    print(f"stream_latency: {spread(delays)} (targets p50 <= 2, p99 <= 10)")
    print(
        f"stream_latency: of which engine -> Redis subscriber (worker's share): "
        f"{spread(at_redis)} ({len(at_redis)} deltas)"
    )
    print(cpu.report("stream_latency: "))


def spread(seconds: list[float]) -> str:
    return ", ".join(f"p{q} {percentile(seconds, q) * 1000:.2f} ms" for q in (50, 90, 99))


if __name__ == "__main__":
    main()
