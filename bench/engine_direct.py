"""Tokens/s of an engine driven directly (no API, no queue, no storage): the ceiling
Ferry's pipeline is compared against (bench/pipeline.py imports `drive_engine`).

    .venv/bin/python bench/engine_direct.py [--requests 64] [--max-tokens 64]
                                           [--engine vllm transformers]

Each request is one user chat message; decoding is greedy by default, so Ferry and the
direct run generate the same tokens for the same prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.engines import (
    Engine,
    GenerationRequest,
    SamplingOptions,
    build_engine,
)
from worker.settings import WorkerSettings

MODEL = "ferry-tiny-chat"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def drive_engine(
    engine: Engine,
    prompts: Sequence[str],
    max_tokens: int,
    *,
    temperature: float | None = 0.0,
) -> dict[str, float]:
    """Send every prompt at once (as a user message) and stream all of them to the end.

    Returns requests, tokens (completion tokens), prompt_tokens, seconds (first submit to
    last finish), tokens_per_s, ttft_p50_s / ttft_p95_s (time to first delta) and
    latency_p50_s / latency_p95_s (time to the last delta).
    """

    async def one(text: str, started: float) -> tuple[int, int, float, float]:
        request = GenerationRequest(
            request_id=f"bench-{uuid.uuid4().hex}",
            messages=[{"role": "user", "content": text}],
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=temperature),
        )
        tokens = prompt_tokens = 0
        first = 0.0
        async for delta in engine.generate(request):
            if not first:
                first = time.perf_counter() - started
            tokens += delta.new_tokens
            prompt_tokens += delta.prompt_tokens or 0
        return tokens, prompt_tokens, first, time.perf_counter() - started

    started = time.perf_counter()
    results = await asyncio.gather(*(one(text, started) for text in prompts))
    seconds = time.perf_counter() - started
    tokens = sum(r[0] for r in results)
    ttfts = [r[2] for r in results]
    latencies = [r[3] for r in results]
    return {
        "requests": float(len(results)),
        "tokens": float(tokens),
        "prompt_tokens": float(sum(r[1] for r in results)),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else 0.0,
        "ttft_p95_s": _quantile(ttfts, 0.95),
        "latency_p50_s": statistics.median(latencies) if latencies else 0.0,
        "latency_p95_s": _quantile(latencies, 0.95),
    }


def prompts(n: int) -> list[str]:
    return [f"Write a short story about the number {i}." for i in range(n)]


async def bench_engine(
    name: Literal["vllm", "transformers"], requests: int, max_tokens: int, repeats: int
) -> None:
    settings = WorkerSettings(
        model=MODEL,
        engine=name,
        concurrency=max(requests, 1),
        max_model_len=2048,
        cpu_kv_cache_gib=2,
    )
    engine = build_engine(settings)
    t0 = time.perf_counter()
    await engine.start()
    print(f"{name}: started in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        texts = prompts(requests)
        await drive_engine(engine, texts[:4], max_tokens)  # warm-up
        for concurrency in sorted({1, 8, requests}):
            best: dict[str, float] = {}
            for _ in range(repeats):
                r = await drive_engine(engine, texts[:concurrency], max_tokens)
                if r["tokens_per_s"] > best.get("tokens_per_s", 0.0):
                    best = r
            print(
                f"{name}: {concurrency:3d} concurrent x {max_tokens} new tokens (greedy): "
                f"{best['tokens']:.0f} tokens in {best['seconds']:.2f} s = "
                f"{best['tokens_per_s']:,.0f} tok/s; TTFT p50 {best['ttft_p50_s'] * 1000:.0f} ms,"
                f" p95 {best['ttft_p95_s'] * 1000:.0f} ms; latency p50 "
                f"{best['latency_p50_s']:.2f} s (best of {repeats})",
                flush=True,
            )
    finally:
        await engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--engine", nargs="+", default=["vllm", "transformers"], choices=["vllm", "transformers"]
    )
    args = parser.parse_args()
    for name in args.engine:
        asyncio.run(bench_engine(name, args.requests, args.max_tokens, args.repeats))


if __name__ == "__main__":  # vLLM spawns engine processes: the guard is required
    main()
