"""Fair share across keys: one key's flood must not starve another key's trickle.

Key A submits `--jobs` (10,000) short jobs at once (`--max-tokens` 4, the tiny chat model);
10 s after A's first submit, key B submits one job every 200 ms for 30 s. Reported: B's
queue wait (its submit -> the job's `started_at`, when a worker claimed it) p50/p99, and
its wait to the first token; A's throughput (jobs/s, first submit -> last job finished)
against a run of A alone on the same deployment just before (`--skip-alone`: only the run
with B). Both runs use one API process and one vLLM worker (FERRY_CONCURRENCY=64).

Target (issue 16): B's p99 queue wait <= 2 s, A keeps >= 90% of its throughput alone.

    .venv/bin/python bench/fairness.py [--jobs 10000] [--max-tokens 4] [--b-every 0.2]
        [--b-for 30] [--b-after 10] [--skip-alone]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sse_clients import bench_client, warm_up
from bench.stack import KEY, bench_logs, bench_stack, percentile

MODEL = "ferry-tiny-chat"
KEY_B = "sk-bench-b"
# A's submits in flight at once: the flood arrives as fast as the API takes it.
_A_CONCURRENCY = 64


@dataclass
class Run:
    a_jobs: int
    a_seconds: float
    # B's jobs: (queue wait, wait to first token), seconds.
    b_waits: list[tuple[float, float]]

    @property
    def a_rate(self) -> float:
        return self.a_jobs / self.a_seconds


def body(text: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
    }


async def submit(client: aiohttp.ClientSession, payload: dict[str, object]) -> str:
    async with client.post("/v1/jobs", json=payload) as response:
        response.raise_for_status()
        return str((await response.json())["id"])


_TIMES = ("created_at", "enqueued_at", "started_at", "first_token_at", "finished_at")


def rows(dsn: str, ids: list[str]) -> list[tuple[str, dict[str, float | None]]]:
    """(status, {created_at, enqueued_at, started_at, first_token_at, finished_at} as epoch
    seconds) per job id."""
    columns = ", ".join(f"extract(epoch FROM {t})" for t in _TIMES)
    with psycopg.connect(dsn) as conn:
        got = conn.execute(
            f"SELECT id, status, {columns} FROM jobs WHERE id = ANY(%s)", (ids,)
        ).fetchall()
    by_id = {r[0]: r[1:] for r in got}
    return [
        (
            str(by_id[i][0]),
            {t: None if v is None else float(v) for t, v in zip(_TIMES, by_id[i][1:], strict=True)},
        )
        for i in ids
    ]


def open_count(dsn: str, ids: list[str]) -> int:
    with psycopg.connect(dsn) as conn:
        (n,) = conn.execute(  # type: ignore[misc]
            "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status IN ('queued', 'running')",
            (ids,),
        ).fetchone()
    return int(n)


async def wait_done(dsn: str, ids: list[str]) -> None:
    for _ in iter(int, 1):  # until none is open (a poll of SQL every half second)
        if not await asyncio.to_thread(open_count, dsn, ids):
            return
        await asyncio.sleep(0.5)


async def flood(url: str, n: int, max_tokens: int, tag: str) -> tuple[float, list[str]]:
    """A's jobs, submitted as fast as the API takes them; (first submit time, ids)."""
    ids: list[str] = [""] * n
    next_index = 0
    async with bench_client(url, KEY) as client:
        started = time.time()

        async def sender() -> None:
            nonlocal next_index
            while next_index < n:
                i = next_index
                next_index += 1
                ids[i] = await submit(client, body(f"{tag} job {i}: say hi.", max_tokens))

        await asyncio.gather(*(sender() for _ in range(_A_CONCURRENCY)))
    return started, ids


async def trickle(
    url: str, after: float, every: float, span: float, max_tokens: int
) -> list[tuple[float, str]]:
    """B's jobs: one every `every` s for `span` s, starting `after` s from now; (submit
    time, id) each."""
    await asyncio.sleep(after)
    sent: list[tuple[float, str]] = []
    async with bench_client(url, KEY_B) as client:
        start = time.monotonic()
        tasks = []
        k = 0
        while k * every < span:
            await asyncio.sleep(max(0.0, start + k * every - time.monotonic()))

            async def one(i: int) -> tuple[float, str]:
                at = time.time()
                return at, await submit(client, body(f"B job {i}: say hi.", max_tokens))

            tasks.append(asyncio.create_task(one(k)))
            k += 1
        sent = list(await asyncio.gather(*tasks))
    return sent


async def one_run(url: str, dsn: str, args: argparse.Namespace, with_b: bool, tag: str) -> Run:
    b_task = (
        asyncio.create_task(trickle(url, args.b_after, args.b_every, args.b_for, args.max_tokens))
        if with_b
        else None
    )
    started, a_ids = await flood(url, args.jobs, args.max_tokens, tag)
    print(f"fairness: {tag}: A's {args.jobs} jobs accepted in {time.time() - started:.1f} s")
    b_sent = await b_task if b_task is not None else []
    await wait_done(dsn, a_ids + [i for _, i in b_sent])
    a_rows = await asyncio.to_thread(rows, dsn, a_ids)
    failed = sum(1 for status, _ in a_rows if status != "succeeded")
    last = max(t["finished_at"] or 0.0 for _, t in a_rows)
    waits = []
    if b_sent:
        b_rows = await asyncio.to_thread(rows, dsn, [i for _, i in b_sent])
        failed += sum(1 for status, _ in b_rows if status != "succeeded")
        waits = [
            ((t["started_at"] or at) - at, (t["first_token_at"] or at) - at)
            for (at, _), (_, t) in zip(b_sent, b_rows, strict=True)
        ]
        # Where B's wait goes: submit -> committed -> released to the queue -> claimed.
        steps = [("submit", None), *((name, name) for name in _TIMES[:4])]
        pairs = [*itertools.pairwise(steps), (steps[1], steps[3])]
        for (a_name, a_key), (b_name, b_key) in pairs:
            gaps = [
                (t[b_key] or 0.0) - (at if a_key is None else (t[a_key] or 0.0))
                for (at, _), (_, t) in zip(b_sent, b_rows, strict=True)
                if t[b_key] is not None and (a_key is None or t[a_key] is not None)
            ]
            if gaps:
                print(
                    f"fairness: {tag}: B {a_name} -> {b_name}: p50 {percentile(gaps, 50):.3f}"
                    f" s, p99 {percentile(gaps, 99):.3f} s ({len(gaps)} jobs)"
                )
    if failed:
        print(f"fairness: {tag}: {failed} jobs did not succeed")
    return Run(len(a_ids), last - started, waits)


async def main_async(url: str, dsn: str, args: argparse.Namespace) -> None:
    async with bench_client(url, KEY) as client:
        await warm_up(client, MODEL, 64)
    alone = None if args.skip_alone else await one_run(url, dsn, args, False, "A alone")
    mixed = await one_run(url, dsn, args, True, "A with B")
    print(
        f"fairness: A: {args.jobs} jobs x {args.max_tokens} max tokens at once; B: one job "
        f"every {args.b_every} s for {args.b_for} s from {args.b_after} s"
    )
    if alone is not None:
        print(
            f"fairness: A alone:  {alone.a_jobs} jobs in {alone.a_seconds:.1f} s = "
            f"{alone.a_rate:.1f} jobs/s"
        )
    print(
        f"fairness: A with B: {mixed.a_jobs} jobs in {mixed.a_seconds:.1f} s = "
        f"{mixed.a_rate:.1f} jobs/s"
        + (f" ({mixed.a_rate / alone.a_rate:.1%} of alone)" if alone is not None else "")
    )
    queue = [w for w, _ in mixed.b_waits]
    first = [f for _, f in mixed.b_waits]
    print(
        f"fairness: B ({len(queue)} jobs): queue wait (submit -> started) p50 "
        f"{percentile(queue, 50):.3f} s, p99 {percentile(queue, 99):.3f} s, max "
        f"{max(queue):.3f} s; to first token p50 {percentile(first, 50):.3f} s, p99 "
        f"{percentile(first, 99):.3f} s"
    )
    print("fairness: target: B p99 queue wait <= 2 s, A with B >= 90% of A alone")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--b-after", type=float, default=10.0)
    parser.add_argument("--b-every", type=float, default=0.2)
    parser.add_argument("--b-for", type=float, default=30.0)
    parser.add_argument("--skip-alone", action="store_true")
    args = parser.parse_args()
    with bench_stack(bench_logs(), FERRY_API_KEYS=f"{KEY},{KEY_B}") as stack:
        url = stack.add_api("api")
        stack.add_worker(MODEL, "vllm")
        dsn = stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
        asyncio.run(main_async(url, dsn, args))


if __name__ == "__main__":
    main()
