"""Prometheus metrics: counters kept as work happens, read from Redis at scrape time.

Jobs end in workers (and in API processes: cancels, expiries), so their counters and
histograms live in Redis (storage/job_metrics.py), written by whoever ends the job; every
API replica exports the same cluster-wide values. Rows deleted by retention do not take
their counts with them, and a scrape never reads the jobs table: its cost grows with
models, queues and workers, never with jobs. HTTP request metrics are this process's own
(api/ops/http_metrics.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.asyncio import Redis

from api.ops.http_metrics import HttpMetrics
from storage.broker import PRIORITY_STEPS, priority_lists
from storage.job_metrics import (
    HISTOGRAMS,
    EngineStats,
    JobMetrics,
    read_engine_stats,
    read_job_metrics,
)
from storage.keys import Lane, queue_name
from storage.pending import PendingJobs
from storage.registry import ModelRegistry

_HISTOGRAM_HELP = {
    "ferry_time_to_first_token_seconds": "Job start to its first token (final attempt)",
    "ferry_request_queue_time_seconds": "Job accepted to started (final attempt)",
    "ferry_e2e_request_latency_seconds": "Job accepted to ended",
}


class _Snapshot:
    """Collected asynchronously, then handed to prometheus_client's sync collector API."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


async def render_metrics(
    redis: Redis, registry: ModelRegistry, http: HttpMetrics | None = None
) -> bytes:
    jobs = await read_job_metrics(redis)
    engines = await read_engine_stats(redis)
    metrics = [*_job_families(jobs, engines), *_engine_families(engines)]
    metrics += await _queue_families(redis, registry)
    workers = GaugeMetricFamily("ferry_live_workers", "Workers with a live heartbeat")
    # The registry's shared read (storage/registry.py): one sorted-set range, no SCAN.
    workers.add_metric([], len(await registry.live_workers()))
    metrics.append(workers)

    collector_registry = CollectorRegistry(auto_describe=False)
    collector_registry.register(_Snapshot(metrics))
    body = bytes(generate_latest(collector_registry))
    if http is not None:
        body += bytes(generate_latest(http.registry))
    return body


def _job_families(jobs: JobMetrics, engines: list[EngineStats]) -> list[Metric]:
    ended = CounterMetricFamily(
        "ferry_jobs_ended", "Jobs that ended, by model and status", labels=["model", "status"]
    )
    for (model, status), n in sorted(jobs.jobs_ended.items()):
        ended.add_metric([model, status], n)

    # Running: the jobs live workers hold. Queued: the rest of those accepted and not ended.
    running: dict[str, int] = defaultdict(int)
    for stats in engines:
        for model, n in stats.jobs_in_flight.items():
            running[model] += n
    queued_g = GaugeMetricFamily("ferry_jobs_queued", "Jobs waiting to run", labels=["model"])
    running_g = GaugeMetricFamily(
        "ferry_jobs_running", "Jobs held by live workers", labels=["model"]
    )
    for model in sorted(set(jobs.jobs_open) | set(running)):
        queued_g.add_metric([model], max(jobs.jobs_open.get(model, 0) - running[model], 0))
        running_g.add_metric([model], running[model])

    generated = CounterMetricFamily(
        "ferry_tokens_generated", "Completion tokens generated", labels=["model"]
    )
    for model, n in sorted(jobs.completion_tokens.items()):
        generated.add_metric([model], n)
    prompt = CounterMetricFamily("ferry_prompt_tokens", "Prompt tokens processed", labels=["model"])
    for model, n in sorted(jobs.prompt_tokens.items()):
        prompt.add_metric([model], n)

    families: list[Metric] = [ended, queued_g, running_g, generated, prompt]
    for histogram in HISTOGRAMS:
        family = HistogramMetricFamily(
            histogram.name, _HISTOGRAM_HELP[histogram.name], labels=["model"]
        )
        for model, values in sorted(jobs.histograms[histogram.name].items()):
            family.add_metric([model], values.buckets, sum_value=values.total)
        families.append(family)
    return families


def _engine_families(engines: list[EngineStats]) -> list[Metric]:
    """Each worker's engine, under vLLM's own names (and its `model_name` label)."""
    labels = ["model_name", "worker_id"]
    running = GaugeMetricFamily(
        "vllm:num_requests_running", "Requests in the engine's running batch", labels=labels
    )
    waiting = GaugeMetricFamily(
        "vllm:num_requests_waiting", "Requests waiting in the engine", labels=labels
    )
    kv_cache = GaugeMetricFamily(
        "vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent)", labels=labels
    )
    for stats in sorted(engines, key=lambda s: s.worker_id):
        values = [stats.model, stats.worker_id]
        if stats.running is not None:
            running.add_metric(values, stats.running)
        if stats.waiting is not None:
            waiting.add_metric(values, stats.waiting)
        if stats.kv_cache_usage is not None:
            kv_cache.add_metric(values, stats.kv_cache_usage)
    return [running, waiting, kv_cache]


async def _queue_families(redis: Redis, registry: ModelRegistry) -> list[Metric]:
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
    return [depth, unclaimed]
