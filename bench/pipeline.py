"""Tokens/s of 64 concurrent jobs through Ferry (HTTP submit -> SSE) divided by tokens/s of
the same engine driven directly with the same prompts, in one run.

Target (issue 2): ratio >= 0.95. Greedy decoding, so both sides generate the same tokens.
Ferry runs first (API + worker processes); then, with the worker stopped, this process
starts the same engine with the same settings and drives it directly. Both sides are
warmed first by a burst as wide as the measured one (other prompts, 4 tokens each), so
what is measured is a warm service (connection pools, worker threads, engine) on both.

    .venv/bin/python bench/pipeline.py [--jobs 64] [--max-tokens 128] [--engine vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import CpuSplit
from bench.engine_direct import drive_engine
from bench.sse_clients import (
    WARM_TOKENS,
    bench_client,
    submit_and_follow,
    warm_prompts,
    warm_up,
)
from bench.stack import KEY, bench_logs, bench_stack, percentile
from worker.engines import build_engine
from worker.settings import WorkerSettings

MODEL = "ferry-tiny-chat"


def prompts(n: int) -> list[str]:
    return [f"Write a short story about the number {i}." for i in range(n)]


async def through_ferry(
    url: str, texts: list[str], max_tokens: int, cpu: CpuSplit
) -> tuple[int, float, dict[str, list[float]]]:
    async with bench_client(url, KEY) as client:

        def body(text: str) -> dict[str, object]:
            return {
                "model": MODEL,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": text}],
            }

        await warm_up(client, MODEL, len(texts))
        started_wall = time.time()
        started = time.perf_counter()
        with cpu:
            results = await asyncio.gather(*(submit_and_follow(client, body(t)) for t in texts))
        elapsed = max(r.finished_at for r in results) - started
        rows = []
        for r in results:
            async with client.get(f"/v1/jobs/{r.job_id}") as response:
                rows.append(await response.json())
    phases = {
        name: sorted(row[name] - started_wall for row in rows)
        for name in ("created_at", "started_at", "first_token_at", "finished_at")
    }
    phases["client_done"] = sorted(r.finished_at - started for r in results)
    return sum(r.completion_tokens for r in results), elapsed, phases


async def directly(
    engine_name: str, texts: list[str], max_tokens: int, cpu: CpuSplit
) -> dict[str, float]:
    settings = WorkerSettings(
        model=MODEL,
        engine=engine_name,  # type: ignore[arg-type]
        concurrency=64,
        cpu_kv_cache_gib=2,
    )
    engine = build_engine(settings)
    await engine.start()
    try:
        await drive_engine(engine, warm_prompts(len(texts)), WARM_TOKENS)  # as Ferry's
        with cpu:
            return await drive_engine(engine, texts, max_tokens)
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    args = parser.parse_args()
    texts = prompts(args.jobs)
    with bench_stack(bench_logs()) as stack:
        url = stack.add_api("api")
        worker = stack.add_worker(MODEL, args.engine)
        cpu = CpuSplit()
        tokens, elapsed, phases = asyncio.run(through_ferry(url, texts, args.max_tokens, cpu))
        worker.stop()
    ferry_rate = tokens / elapsed
    direct_cpu = CpuSplit()
    direct = asyncio.run(directly(args.engine, texts, args.max_tokens, direct_cpu))
    direct_rate = direct["tokens"] / direct["seconds"]
    print(
        f"pipeline: {args.jobs} concurrent jobs x {args.max_tokens} max tokens, "
        f"{args.engine} engine, greedy"
    )
    print(
        f"pipeline: through Ferry (HTTP submit -> SSE): {tokens} tokens in {elapsed:.2f} s "
        f"= {ferry_rate:,.0f} tok/s"
    )
    print(
        f"pipeline: engine driven directly:            {direct['tokens']:.0f} tokens in "
        f"{direct['seconds']:.2f} s = {direct_rate:,.0f} tok/s"
    )
    # When each job reached each point, seconds after the first submit (from the job rows;
    # client_done is when its SSE client saw `done`): where Ferry's extra time goes.
    for name, values in phases.items():
        print(
            f"pipeline: {name:>14}: first {values[0]:6.3f}  p50 {percentile(values, 50):6.3f}"
            f"  last {values[-1]:6.3f} s"
        )
    print(cpu.report("pipeline: "))
    print("pipeline: the direct run (here the engine's front end runs in the benchmark process):")
    print(direct_cpu.report("pipeline: "))
    print(
        f"pipeline: direct run: ttft p50 {direct['ttft_p50_s']:.3f} s, "
        f"latency p50 {direct['latency_p50_s']:.3f} s"
    )
    print(f"pipeline: ratio {ferry_rate / direct_rate:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
