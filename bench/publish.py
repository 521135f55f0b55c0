"""CPU a worker spends per job event it writes to Redis (`JobEventStream.publish`): the
per-token cost of the worker's side of streaming, without an engine.

Writes `--rounds` batches of one delta for each of `--jobs` jobs (an engine step's worth of
events) to Redis db 9, as the worker's event publisher does, and prints CPU and wall time
per event.

    .venv/bin/python bench/publish.py [--jobs 64] [--rounds 400]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop
from redis.asyncio import Redis

from bench.stack import REDIS_URL
from storage.events import EventType, JobEvent, JobEventStream


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(jobs: int, rounds: int) -> None:
    redis = Redis.from_url(REDIS_URL)
    await redis.flushdb()
    stream = JobEventStream(redis, maxlen=1000, ttl_seconds=60)
    ids = [f"bench-{i:04d}" for i in range(jobs)]
    try:
        await stream.publish(
            [(job, JobEvent("1-0", EventType.DELTA, {"text": ""})) for job in ids]
        )  # warm: connection, script loaded
        cpu, wall = cpu_seconds(), time.perf_counter()
        for seq in range(1, rounds + 1):
            await stream.publish(
                [(job, JobEvent.delta(f"1-{seq}", " word", time.time())) for job in ids]
            )
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    finally:
        await redis.flushdb()
        await redis.aclose()
    events = jobs * rounds
    print(
        f"publish: {events} events ({rounds} batches of {jobs}): "
        f"{cpu / events * 1e6:.1f} us CPU and {wall / events * 1e6:.1f} us wall per event"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=400)
    args = parser.parse_args()
    uvloop.run(run(args.jobs, args.rounds))


if __name__ == "__main__":
    main()
