"""Ingest of a 50,000-line batch file by ONE API process (PostgreSQL + Redis + a local
object directory): upload, validate (every line), store as jobs, and send the first bulk
window to Celery. Target (issue 4): <= 30 s in all.

No engine runs: the model and one worker (64 engine slots, default bulk settings) are
announced in Redis as a worker would, so the feeder sends that worker's bulk window and the
messages (several lines each) wait on the bulk queue.

    .venv/bin/python bench/batch_ingest.py [--lines 50000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import redis

from api.jobs.enqueue import BULK_LINES_PER_MESSAGE
from bench.stack import KEY, bench_logs, bench_stack
from storage.broker import priority_lists
from storage.keys import queue_name
from storage.pending import SyncPendingJobs
from storage.registry import ServedModel, WorkerBeat
from storage.registry import announce as announce_model
from worker.settings import WorkerSettings

MODEL = "bench-model"
WORKER = WorkerSettings(concurrency=64)


def batch_file(path: Path, lines: int) -> int:
    with path.open("w") as out:
        for i in range(lines):
            out.write(
                json.dumps(
                    {
                        "custom_id": f"request-{i}",
                        "method": "POST",
                        "url": "/v1/chat/completions",
                        "body": {
                            "model": MODEL,
                            "max_tokens": 32,
                            "temperature": 0,
                            "messages": [
                                {"role": "system", "content": "You are terse."},
                                {"role": "user", "content": f"Summarise item {i}."},
                            ],
                        },
                    }
                )
                + "\n"
            )
    return path.stat().st_size


def announce(r: redis.Redis) -> None:
    """The model and a live worker, as a worker's heartbeat would write them."""
    beat = WorkerBeat(
        "bench",
        MODEL,
        "vllm",
        0,
        time.time(),
        concurrency=WORKER.concurrency,
        bulk_window=WORKER.bulk_window,
        bulk_window_busy=WORKER.bulk_window_busy,
    )
    announce_model(r, ServedModel(MODEL, 2048, "vllm"), worker=beat, ttl_seconds=600)


def bulk_messages(r: redis.Redis) -> int:
    return sum(int(r.llen(name)) for name in priority_lists(queue_name(MODEL, "bulk")))


def window_sent(r: redis.Redis, window: int) -> bool:
    """All of the window's lines are marked sent and their messages are on the queue."""
    messages = -(-window // BULK_LINES_PER_MESSAGE)
    return SyncPendingJobs(r).count() >= window and bulk_messages(r) >= messages


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    objects = Path(tempfile.mkdtemp(prefix="ferry-bench-objects-"))
    source = objects / "input.jsonl"
    size = batch_file(source, args.lines)
    with bench_stack(
        bench_logs(), FERRY_OBJECT_STORE="local", FERRY_OBJECT_DIR=str(objects)
    ) as stack:
        url = stack.add_api("api", FERRY_LOG_LEVEL="warning")
        r = redis.Redis.from_url(stack.env["FERRY_REDIS_URL"])
        announce(r)
        with httpx.Client(
            base_url=url, timeout=600, headers={"Authorization": f"Bearer {KEY}"}
        ) as http:
            started = time.perf_counter()
            with source.open("rb") as handle:
                uploaded = http.post(
                    "/v1/files", data={"purpose": "batch"}, files={"file": ("input.jsonl", handle)}
                )
            uploaded.raise_for_status()
            t_upload = time.perf_counter()
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
            while (batch := http.get(f"/v1/batches/{batch_id}").json())["status"] == "validating":
                time.sleep(0.05)
            t_stored = time.perf_counter()
            window = WORKER.bulk_window
            while not window_sent(r, window):
                time.sleep(0.02)
            t_sent = time.perf_counter()
    counts = batch["request_counts"]
    print(
        f"batch_ingest: {args.lines:,} lines, {size / 1e6:.1f} MB, status "
        f"{batch['status']}, {counts['total']:,} lines counted, {counts['failed']} invalid"
    )
    print(
        f"batch_ingest: upload (checked, streamed to the object store) {t_upload - started:.2f} s"
    )
    print(f"batch_ingest: validate + store {counts['total']:,} jobs {t_stored - t_upload:.2f} s")
    print(
        f"batch_ingest: first bulk window ({window} lines) on the queue {t_sent - t_stored:.2f} s"
    )
    print(f"batch_ingest: total {t_sent - started:.2f} s (target <= 30 s)")


if __name__ == "__main__":
    main()
