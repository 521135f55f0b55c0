"""CPU one API process spends per job event it streams to SSE subscribers, without an
engine or a worker: the API's share of the per-token cost of streaming.

Creates `--jobs` jobs (no worker runs them: the model is announced in the registry as a
worker would), opens one `GET /v1/jobs/{id}/events` stream for each, then writes events to
Redis exactly as a worker's publisher does (`JobEventStream.publish`, one delta for every
job per step, `--steps` steps every `--interval-ms`, then usage and done) and prints the
API's CPU per event delivered and the delay from publish to client.

    .venv/bin/python bench/fanout.py [--jobs 64] [--steps 200] [--interval-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis
import uvloop
from redis.asyncio import Redis

from bench.sse_clients import StreamResult, bench_client, follow
from bench.stack import KEY, bench_logs, bench_stack, percentile
from storage.events import EventType, JobEvent, JobEventStream
from storage.keys import MODELS_HASH

MODEL = "bench-model"


async def run(
    url: str, redis_url: str, api_pid: int, jobs: int, steps: int, interval: float
) -> None:
    stream = JobEventStream(Redis.from_url(redis_url), maxlen=1000, ttl_seconds=600)
    api = psutil.Process(api_pid)
    async with bench_client(url, KEY) as client:
        ids = []
        for i in range(jobs):
            async with client.post(
                "/v1/jobs",
                json={
                    "model": MODEL,
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": f"fan-out {i}"}],
                },
            ) as response:
                response.raise_for_status()
                ids.append((await response.json())["id"])
        results = [StreamResult(job_id) for job_id in ids]
        followers = [asyncio.create_task(follow(client, result)) for result in results]
        await asyncio.sleep(1.0)  # every stream subscribed
        before = api.cpu_times()
        started = time.perf_counter()
        for seq in range(1, steps + 1):
            now = time.time()
            await stream.publish(
                [(job_id, JobEvent.delta(f"1-{seq}", " tok", now)) for job_id in ids]
            )
            await asyncio.sleep(max(0.0, started + seq * interval - time.perf_counter()))
        await stream.publish(
            [
                (job_id, event)
                for job_id in ids
                for event in (
                    JobEvent(f"1-{steps + 1}", EventType.USAGE, {"completion_tokens": steps}),
                    JobEvent(f"1-{steps + 2}", EventType.DONE, {"finish_reason": "length"}),
                )
            ]
        )
        await asyncio.gather(*followers)
        after = api.cpu_times()
        elapsed = time.perf_counter() - started
    cpu = (after.user + after.system) - (before.user + before.system)
    delays = [d for r in results for d in r.delays]
    events = len(delays)
    assert all(r.text == " tok" * steps for r in results), "a stream lost or repeated text"
    print(
        f"fanout: {jobs} streams x {steps} deltas every {interval * 1000:.0f} ms "
        f"({events / elapsed:,.0f} events/s for {elapsed:.2f} s)"
    )
    print(
        f"fanout: API CPU {cpu:.2f} s = {cpu / events * 1e6:.1f} us per event delivered "
        f"(in the kernel: {(after.system - before.system) / events * 1e6:.1f} us)"
    )
    print(
        "fanout: publish -> client delay "
        + ", ".join(f"p{q} {percentile(delays, q) * 1000:.2f} ms" for q in (50, 90, 99))
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    args = parser.parse_args()
    with bench_stack(bench_logs()) as stack:
        url = stack.add_api("api", FERRY_LOG_LEVEL="warning")
        redis_url = stack.env["FERRY_REDIS_URL"]
        redis.Redis.from_url(redis_url).hset(
            MODELS_HASH,
            MODEL,
            json.dumps(
                {
                    "name": MODEL,
                    "max_model_len": 2048,
                    "engine": "vllm",
                    "supports_images": False,
                    "created": 0,
                }
            ),
        )
        uvloop.run(
            run(
                url,
                redis_url,
                stack.procs[0].popen.pid,
                args.jobs,
                args.steps,
                args.interval_ms / 1000,
            )
        )


if __name__ == "__main__":
    main()
