"""Interactive time to first token on an idle worker vs while a 2,000-line batch runs on
the same worker (one API process, one worker: vLLM unless --engine says otherwise).
Target (issue 4): <= 2x.

TTFT is what a client sees: from sending a streaming `POST /v1/chat/completions` to the
first chunk carrying text. Requests go one at a time (a person at a chat box), the same
prompts idle and under load; the batch's lines are short chat requests like
bench/batch_vs_runbatch.py's.

    .venv/bin/python bench/interactive_under_bulk.py [--samples 30] [--lines 2000] [--engine vllm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.batch_vs_runbatch import CONCURRENCY, KV_CACHE_GIB, MODEL, write_lines
from bench.stack import KEY, bench_logs, bench_stack, percentile


def first_token_seconds(http: httpx.Client, i: int) -> tuple[float, str]:
    body = {
        "model": MODEL,
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": f"Quick question number {i}?"}],
    }
    started = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        job_id = response.headers["X-Ferry-Job-Id"]
        lines = response.iter_lines()
        for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or []
            if choices and choices[0]["delta"].get("content"):
                elapsed = time.perf_counter() - started
                for _ in lines:  # let the job finish
                    pass
                return elapsed, job_id
    raise RuntimeError("the stream ended without text")


def measure(http: httpx.Client, samples: int) -> tuple[list[float], list[float], list[float]]:
    """Client TTFTs, and the jobs' own queue (created -> started) and engine TTFT (started
    -> first token) seconds, to see where the time went."""
    results = [first_token_seconds(http, i) for i in range(samples)]
    timings = [http.get(f"/v1/jobs/{job_id}").json()["timings"] for _, job_id in results]
    return (
        [t for t, _ in results],
        [x["queue_seconds"] for x in timings],
        [x["ttft_seconds"] for x in timings],
    )


def ms(values: list[float]) -> str:
    p50, p90 = statistics.median(values), percentile(values, 90)
    return f"p50 {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms"


def batch_progress(http: httpx.Client, batch_id: str) -> dict[str, object]:
    batch: dict[str, object] = http.get(f"/v1/batches/{batch_id}").json()
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--bulk-share", default=None, help="FERRY_BULK_SHARE for the worker (default: its own)"
    )
    parser.add_argument("--engine", default="vllm", choices=["vllm", "transformers"])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ferry-bench-bulk-"))
    source = work / "input.jsonl"
    write_lines(source, args.lines, args.max_tokens)
    with bench_stack(
        bench_logs(),
        FERRY_OBJECT_STORE="local",
        FERRY_OBJECT_DIR=str(work / "objects"),
        FERRY_CONCURRENCY=str(CONCURRENCY),
        VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB,
    ) as stack:
        url = stack.add_api("api", FERRY_LOG_LEVEL="warning")
        if args.bulk_share:
            stack.env["FERRY_BULK_SHARE"] = args.bulk_share
        stack.add_worker(MODEL, args.engine)
        with httpx.Client(
            base_url=url, timeout=600, headers={"Authorization": f"Bearer {KEY}"}
        ) as http:
            measure(http, 3)  # warm-up
            idle, idle_queue, idle_engine = measure(http, args.samples)
            with source.open("rb") as handle:
                uploaded = http.post(
                    "/v1/files", data={"purpose": "batch"}, files={"file": ("input.jsonl", handle)}
                )
            uploaded.raise_for_status()
            created = http.post(
                "/v1/batches",
                json={
                    "input_file_id": uploaded.json()["id"],
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
            )
            created.raise_for_status()
            batch_id = created.json()["id"]
            # Measure once the batch is running at full width.
            while True:
                batch = batch_progress(http, batch_id)
                counts = batch["request_counts"]
                assert isinstance(counts, dict)
                if counts["completed"] >= 50:
                    break
                time.sleep(0.2)
            done_before = counts["completed"]
            loaded, loaded_queue, loaded_engine = measure(http, args.samples)
            batch = batch_progress(http, batch_id)
            counts = batch["request_counts"]
            assert isinstance(counts, dict)
            done_after, status = counts["completed"], batch["status"]
    idle_p50, loaded_p50 = statistics.median(idle), statistics.median(loaded)
    print(
        f"interactive_under_bulk: {args.samples} sequential streaming chat requests "
        f"(16 tokens) idle, then during a {args.lines:,}-line batch "
        f"({done_before} -> {done_after} lines done while measuring, batch {status})"
    )
    for name, total, queue, engine in (
        ("idle      ", idle, idle_queue, idle_engine),
        ("under bulk", loaded, loaded_queue, loaded_engine),
    ):
        print(
            f"interactive_under_bulk: {name} TTFT {ms(total)} (of which queued "
            f"{ms(queue)}; started -> first token {ms(engine)})"
        )
    print(f"interactive_under_bulk: ratio of p50s {loaded_p50 / idle_p50:.2f} (target <= 2)")


if __name__ == "__main__":
    main()
