"""A real Ferry deployment for benchmarks: its own PostgreSQL database and Redis db,
API process(es) and one worker, started and stopped by the benchmark."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from ferry_testing.procs import Proc, start_api, start_worker
from storage.migrate import upgrade
from storage.registry import live_worker_ids

PG_ADMIN = os.environ.get("FERRY_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FERRY_BENCH_REDIS", "redis://127.0.0.1:6379/9")
KEY = "sk-bench"


@dataclass
class BenchStack:
    database_url: str
    env: dict[str, str]
    logs: Path
    api_urls: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)

    def add_api(self, name: str, **env: str) -> str:
        proc, url = start_api(name, {**self.env, **env}, self.logs)
        self.procs.append(proc)
        self.api_urls.append(url)
        return url

    def add_worker(self, model: str, engine: str, served_name: str | None = None) -> Proc:
        r = redis.Redis.from_url(self.env["FERRY_REDIS_URL"])

        def registered(marker: str) -> bool:
            return any(marker in w for w in live_worker_ids(r))

        proc = start_worker(
            f"worker-{engine}", model, served_name or model, engine, self.env, self.logs, registered
        )
        self.procs.append(proc)
        return proc


@contextlib.contextmanager
def bench_stack(logs: Path, **env: str) -> Iterator[BenchStack]:
    name = f"ferry_bench_{os.getpid()}"
    subprocess.run(["psql", PG_ADMIN, "-q", "-c", f"CREATE DATABASE {name}"], check=True)
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    database_url = f"{url}/{name}"
    upgrade(database_url)
    redis.Redis.from_url(REDIS_URL).flushdb()
    stack = BenchStack(
        database_url,
        {
            "FERRY_DATABASE_URL": database_url,
            "FERRY_REDIS_URL": REDIS_URL,
            "FERRY_API_KEYS": KEY,
            "FERRY_CONCURRENCY": "64",
            "VLLM_CPU_KVCACHE_SPACE": "2",
            **env,
        },
        logs,
    )
    try:
        yield stack
    finally:
        for proc in reversed(stack.procs):
            proc.stop()
        subprocess.run(
            ["psql", PG_ADMIN, "-q", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
            check=False,
        )
        redis.Redis.from_url(REDIS_URL).flushdb()


def bench_logs() -> Path:
    """A fresh folder for the processes' logs, kept after the run (its path is printed)."""
    path = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    print(f"logs: {path}", flush=True)
    return path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
