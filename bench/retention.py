"""The retention sweep over many old jobs: rows deleted per second, and how long each
bounded DELETE takes (the longest any row lock of the sweep is held). First, how long the
reconciler's count of open jobs per model takes over the same table (a tenth queued).

    .venv/bin/python bench/retention.py [rows] [batch size]

Uses a database of its own on FERRY_BENCH_PG (made and dropped); no API or worker.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import event

from api.core.db import Database
from api.ops.retention import RetentionPolicy, RetentionSweeper
from bench.stack import PG_ADMIN, REDIS_URL, percentile
from storage.db import create_db_engine, create_session_factory
from storage.migrate import upgrade
from storage.objects import LocalObjectStore
from storage.repositories import jobs as jobs_repo
from storage.settings import StorageSettings

# A tenth of the jobs are still queued and half of the rest are younger than the age.
FILL = """
INSERT INTO api_keys (id, key_hash, created_at) VALUES ('key', 'hash', now());
INSERT INTO jobs (id, owner_id, model, kind, lane, status, priority, request, attempts,
                  created_at, finished_at, deltas)
SELECT 'job_' || lpad(to_hex(g), 24, '0'), 'key', 'm', 'chat', 'interactive',
       CASE WHEN g % 10 = 0 THEN 'queued' ELSE 'succeeded' END, 0,
       '{"messages": [{"role": "user", "content": "hello"}]}', 0,
       now() - make_interval(days => g % 60),
       CASE WHEN g % 10 = 0 THEN NULL ELSE now() - make_interval(days => g % 60) END,
       '["Once", " upon", " a", " time"]'
FROM generate_series(1, {rows}) g;
ANALYZE;
"""


async def sweep(database_url: str, batch_size: int) -> None:
    engine = create_db_engine(StorageSettings(database_url=database_url))
    durations: list[float] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def started(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["started"] = time.perf_counter()

    @event.listens_for(engine.sync_engine, "after_cursor_execute")
    def ended(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM JOBS"):
            durations.append(time.perf_counter() - conn.info["started"])

    age = 30 * 86400.0
    policy = RetentionPolicy(age, 0, 0, 0, 0, 0, batch_size=batch_size, pause_seconds=0)
    objects = LocalObjectStore(Path(tempfile.mkdtemp(prefix="ferry-bench-objects-")))
    sweeper = RetentionSweeper(
        Database(create_session_factory(engine)),
        Redis.from_url(REDIS_URL),
        objects,
        policy,
        interval_seconds=60,
    )
    sessions = create_session_factory(engine)
    counts: list[float] = []
    for _ in range(5):
        started_at = time.perf_counter()
        async with sessions() as session:
            open_jobs = await jobs_repo.open_jobs_by_model(session)
        counts.append((time.perf_counter() - started_at) * 1000)
    print(f"open jobs {open_jobs}: count p50 {percentile(counts, 50):.1f} ms of 5")
    begun = time.perf_counter()
    report = await sweeper.sweep_once()
    took = time.perf_counter() - begun
    await engine.dispose()
    deleted = report.deleted["jobs"]
    ms = [d * 1000 for d in durations]
    print(f"deleted {deleted} jobs in {report.statements['jobs']} statements, {took:.2f} s")
    print(f"rows/s {deleted / took:,.0f}")
    p50, p99 = percentile(ms, 50), percentile(ms, 99)
    print(f"DELETE ms: p50 {p50:.1f}  p99 {p99:.1f}  max {max(ms):.1f}")


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    name = f"ferry_bench_{os.getpid()}"
    subprocess.run(["psql", PG_ADMIN, "-q", "-c", f"CREATE DATABASE {name}"], check=True)
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        upgrade(f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}")
        fill = FILL.replace("{rows}", str(rows))
        subprocess.run(["psql", f"{base}/{name}", "-q", "-c", fill], check=True)
        print(f"{rows} jobs, batch size {batch_size}")
        asyncio.run(
            sweep(f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}", batch_size)
        )
    finally:
        subprocess.run(
            ["psql", PG_ADMIN, "-q", "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
            check=False,
        )


if __name__ == "__main__":
    main()
