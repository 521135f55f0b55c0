"""Jobs accepted per second by ONE API process (PostgreSQL + Redis), and p99 latency.

Targets (issue 2): >= 1,000 jobs/s, p99 <= 50 ms. No worker runs: acceptance only (the
model is announced in the registry as a worker would). The load generator runs in this
process on the same 2-core machine, so it competes with the API for CPU.

    .venv/bin/python bench/submit.py [--jobs 5000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import redis

from bench.stack import KEY, bench_stack, percentile

MODEL = "bench-model"


async def load(url: str, jobs: int, concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 16}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        remaining = jobs

        async def user() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await client.post("/v1/jobs", json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 202:
                    errors += 1

        # Warm up connections and caches, then measure.
        for _ in range(50):
            await client.post("/v1/jobs", json=body)
        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return elapsed, latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logs, bench_stack(Path(logs)) as stack:
        url = stack.add_api("api")
        redis.Redis.from_url(stack.env["FERRY_REDIS_URL"]).hset(
            "ferry:models", MODEL, json.dumps({"name": MODEL, "max_model_len": 2048,
                                               "engine": "vllm", "supports_images": False,
                                               "created": 0}))
        elapsed, latencies, errors = asyncio.run(load(url, args.jobs, args.concurrency))
    rate = len(latencies) / elapsed
    print(f"submit: {len(latencies)} jobs, {args.concurrency} concurrent clients, "
          f"{errors} errors")
    print(f"submit: {rate:,.0f} jobs/s accepted (target >= 1,000)")
    print(f"submit: latency p50 {percentile(latencies, 50) * 1000:.1f} ms, "
          f"p99 {percentile(latencies, 99) * 1000:.1f} ms (target p99 <= 50 ms)")


if __name__ == "__main__":
    main()
