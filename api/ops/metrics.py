"""Prometheus metrics, read from SQL and Redis at scrape time.

Jobs run on workers, not in the API process, so counters kept in API memory would see
little. Instead every scrape asks the source of truth: job counts by status, token totals
and the time-to-first-token histogram from SQL (identical on every API replica), queue
depth from the broker's lists.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis

from api.core.db import Database
from storage.broker import PRIORITY_STEPS, priority_lists
from storage.keys import Lane, queue_name
from storage.models import JobStatus
from storage.pending import PendingJobs
from storage.registry import ModelRegistry
from storage.repositories import jobs as jobs_repo

TTFT_BOUNDS_MS = [25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]


class _Snapshot:
    """Collected asynchronously, then handed to prometheus_client's sync collector API."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


async def render_metrics(db: Database, redis: Redis, registry: ModelRegistry) -> bytes:
    async with db.read() as session:
        by_status = await jobs_repo.count_by_status(session)
        tokens = await jobs_repo.token_totals(session)
        buckets, count, total_ms = await jobs_repo.ttft_histogram(session, TTFT_BOUNDS_MS)

    jobs = GaugeMetricFamily("ferry_jobs", "Jobs by status", labels=["status"])
    for status in JobStatus:
        jobs.add_metric([status.value], by_status.get(status, 0))

    generated = CounterMetricFamily("ferry_tokens_generated", "Completion tokens generated")
    generated.add_metric([], tokens.completion_tokens)
    prompt = CounterMetricFamily("ferry_prompt_tokens", "Prompt tokens processed")
    prompt.add_metric([], tokens.prompt_tokens)

    ttft = HistogramMetricFamily(
        "ferry_time_to_first_token_seconds", "Job start to first token (final attempt)"
    )
    ttft.add_metric(
        [],
        [(str(b / 1000), c) for b, c in zip(TTFT_BOUNDS_MS, buckets, strict=True)]
        + [("+Inf", count)],
        sum_value=total_ms / 1000,
    )

    depth = GaugeMetricFamily(
        "ferry_queue_depth", "Messages waiting on the broker", labels=["queue"]
    )
    models = await registry.models()
    pipe = redis.pipeline(transaction=False)
    names = [queue_name(m, lane) for m in models for lane in Lane]
    for name in names:
        for key in priority_lists(name):
            pipe.llen(key)
    PendingJobs.count_in(pipe)
    *lengths, pending = await pipe.execute()
    steps = len(PRIORITY_STEPS)
    for i, name in enumerate(names):
        depth.add_metric([name], sum(lengths[i * steps : (i + 1) * steps]))
    unclaimed = GaugeMetricFamily(
        "ferry_jobs_sent_unclaimed", "Jobs whose message was sent and not yet claimed"
    )
    unclaimed.add_metric([], pending)

    workers = GaugeMetricFamily("ferry_live_workers", "Workers with a live heartbeat")
    workers.add_metric([], len(await registry.live_workers()))

    collector_registry = CollectorRegistry(auto_describe=False)
    collector_registry.register(
        _Snapshot([jobs, generated, prompt, ttft, depth, unclaimed, workers])
    )
    return bytes(generate_latest(collector_registry))
