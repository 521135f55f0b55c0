"""Delay from the engine yielding a delta to the SSE client receiving it, 64 streams.

Targets (issue 2): p50 <= 2 ms, p99 <= 10 ms. Each delta event carries `ts`, the time the
worker's runner got it from the engine; the client notes when the event arrives. Worker,
API, Redis and the clients share this machine's clock (and its 2 cores).

    .venv/bin/python bench/stream_latency.py [--streams 64] [--max-tokens 128]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sse_clients import bench_client, submit_and_follow
from bench.stack import KEY, bench_logs, bench_stack, percentile

MODEL = "ferry-tiny-chat"


async def run(url: str, streams: int, max_tokens: int) -> list[float]:
    async with bench_client(url, KEY) as client:
        def body(i: int) -> dict[str, object]:
            return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Tell story number {i}."}]}

        await asyncio.gather(*(submit_and_follow(client, body(i)) for i in range(4)))  # warm
        results = await asyncio.gather(*(submit_and_follow(client, body(i))
                                         for i in range(streams)))
    return [d for r in results for d in r.delays]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engine", default="vllm")
    args = parser.parse_args()
    with bench_stack(bench_logs()) as stack:
        url = stack.add_api("api")
        stack.add_worker(MODEL, args.engine)
        delays = asyncio.run(run(url, args.streams, args.max_tokens))
    print(f"stream_latency: {len(delays)} deltas over {args.streams} streams "
          f"({args.engine} engine)")
    print(f"stream_latency: p50 {percentile(delays, 50) * 1000:.2f} ms, "
          f"p90 {percentile(delays, 90) * 1000:.2f} ms, "
          f"p99 {percentile(delays, 99) * 1000:.2f} ms (targets p50 <= 2, p99 <= 10)")


if __name__ == "__main__":
    main()
