"""Cluster-wide job metrics, kept in Redis as work happens (never aggregated from SQL).

Jobs end in worker processes and in API processes (a cancel, an expiry), and rows are
deleted by retention, so neither process memory nor SQL can hold counters that must never
go down. Whoever moves a job into a terminal status in SQL calls `record_job_end` right
after its commit; every API replica reads the same hashes and exports the same values.

Layout: one hash per metric family under `ferry:metrics:`, fields JSON arrays of label
values (`["model", "status"]`); histogram fields are one bucket each (not cumulative),
plus `["model", "sum"]`. A scrape reads each hash once: its cost grows with models and
buckets, never with jobs.

Each worker also writes its engine's load (`publish_engine_stats`): an expiring key per
worker, found through a sorted set scored by expiry time (no SCAN).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from storage.keys import ENGINE_STATS_INDEX, ENGINE_STATS_PREFIX, JOB_METRICS_PREFIX

# vLLM's buckets (vllm/v1/metrics/buckets.py), so dashboards built for vLLM read alike.
TIME_TO_FIRST_TOKEN_BUCKETS: tuple[float, ...] = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

JOBS_ENDED = f"{JOB_METRICS_PREFIX}jobs_ended"
# Jobs created and not yet ended, per model (queued + running).
JOBS_OPEN = f"{JOB_METRICS_PREFIX}jobs_open"
TOKENS = f"{JOB_METRICS_PREFIX}tokens"


@dataclass(frozen=True, slots=True)
class Histogram:
    name: str
    key: str
    buckets: tuple[float, ...]


TTFT = Histogram(
    "ferry_time_to_first_token_seconds",
    f"{JOB_METRICS_PREFIX}ttft",
    TIME_TO_FIRST_TOKEN_BUCKETS,
)
QUEUE_TIME = Histogram(
    "ferry_request_queue_time_seconds",
    f"{JOB_METRICS_PREFIX}queue_time",
    REQUEST_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "ferry_e2e_request_latency_seconds",
    f"{JOB_METRICS_PREFIX}e2e_latency",
    REQUEST_LATENCY_BUCKETS,
)
HISTOGRAMS = (TTFT, QUEUE_TIME, E2E_LATENCY)


# Jobs that were open before their acceptance was counted (an upgrade, Redis emptied)
# must not drive the open count below zero for good: it stops at zero and heals once
# the backlog drains.
_DECREMENT_TO_ZERO = """
local v = redis.call('HINCRBY', KEYS[1], ARGV[1], -tonumber(ARGV[2]))
if v < 0 then
  redis.call('HSET', KEYS[1], ARGV[1], 0)
end
return 0
"""


def _field(*labels: str) -> str:
    return json.dumps(labels)


def _bucket_of(value: float, buckets: tuple[float, ...]) -> str:
    for bound in buckets:
        if value <= bound:
            return repr(bound)
    return "+Inf"


async def record_jobs_created(pipe_or_redis: Redis | Pipeline, by_model: Mapping[str, int]) -> None:
    """New job rows committed (queued), counted per model."""
    pipe, own = _pipeline(pipe_or_redis)
    for model, n in by_model.items():
        if n:
            pipe.hincrby(JOBS_OPEN, model, n)
    if own:
        await pipe.execute()


async def record_job_end(
    pipe_or_redis: Redis | Pipeline,
    model: str,
    status: str,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    ttft_s: float | None = None,
    queue_wait_s: float | None = None,
    e2e_s: float | None = None,
    *,
    ended: bool = True,
    count: int = 1,
) -> None:
    """A job's end, after the commit that made it terminal. `ended=False` records only
    what the job used and took (a worker's end of a job that an API process cancelled,
    which counted the end itself). Given a pipeline, only queues the commands (the caller
    executes it with its own); given a client, writes them in one round trip."""
    pipe, own = _pipeline(pipe_or_redis)
    if ended:
        pipe.hincrby(JOBS_ENDED, _field(model, status), count)
        pipe.eval(_DECREMENT_TO_ZERO, 1, JOBS_OPEN, model, count)
    if prompt_tokens:
        pipe.hincrby(TOKENS, _field(model, "prompt"), prompt_tokens)
    if completion_tokens:
        pipe.hincrby(TOKENS, _field(model, "completion"), completion_tokens)
    for histogram, value in ((TTFT, ttft_s), (QUEUE_TIME, queue_wait_s), (E2E_LATENCY, e2e_s)):
        if value is None:
            continue
        value = max(value, 0.0)
        pipe.hincrby(histogram.key, _field(model, _bucket_of(value, histogram.buckets)), 1)
        pipe.hincrbyfloat(histogram.key, _field(model, "sum"), value)
    if own:
        await pipe.execute()


async def record_jobs_ended(
    pipe_or_redis: Redis | Pipeline, status: str, by_model: Mapping[str, int]
) -> None:
    """Many jobs ended at once with nothing to count but their end (a batch cancelled)."""
    pipe, own = _pipeline(pipe_or_redis)
    for model, n in by_model.items():
        if n:
            await record_job_end(pipe, model, status, count=n)
    if own:
        await pipe.execute()


async def read_jobs_open(redis: Redis) -> dict[str, int]:
    return {_text(k): int(v) for k, v in (await redis.hgetall(JOBS_OPEN)).items()}


async def correct_jobs_open(
    redis: Redis,
    counted: Mapping[str, int],
    read_before: Mapping[str, int],
    read_after: Mapping[str, int],
) -> dict[str, int]:
    """Bring the open-job counts to `counted` (SQL's count, made between the two reads),
    for the models whose count did not move from `read_before` to `read_after`: a job
    committed around SQL's count but counted in Redis after it would otherwise be counted
    twice or not at all. A model whose jobs never pause waits for a correction. Applied as
    differences, so what is counted meanwhile stays. The corrections made, per model."""
    deltas = {
        model: counted.get(model, 0) - read_before.get(model, 0)
        for model in set(counted) | set(read_before)
        if read_before.get(model, 0) == read_after.get(model, 0)
    }
    deltas = {model: delta for model, delta in deltas.items() if delta}
    if deltas:
        pipe = redis.pipeline(transaction=False)
        for model, delta in sorted(deltas.items()):
            pipe.eval(_DECREMENT_TO_ZERO, 1, JOBS_OPEN, model, -delta)
        await pipe.execute()
    return deltas


def _pipeline(pipe_or_redis: Redis | Pipeline) -> tuple[Pipeline, bool]:
    if isinstance(pipe_or_redis, Pipeline):
        return pipe_or_redis, False
    return pipe_or_redis.pipeline(transaction=False), True


# -- reading (the API's /metrics) ---------------------------------------------------------


@dataclass(slots=True)
class HistogramValues:
    """One model's histogram: cumulative (bound, count) pairs ending with +Inf, and sum."""

    buckets: list[tuple[str, float]]
    total: float


@dataclass(slots=True)
class JobMetrics:
    jobs_ended: dict[tuple[str, str], int] = field(default_factory=dict)
    jobs_open: dict[str, int] = field(default_factory=dict)
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    completion_tokens: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, dict[str, HistogramValues]] = field(default_factory=dict)


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def read_job_metrics(redis: Redis) -> JobMetrics:
    """Every job counter and histogram, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for key in (JOBS_ENDED, JOBS_OPEN, TOKENS, *(h.key for h in HISTOGRAMS)):
        pipe.hgetall(key)
    ended, opened, tokens, *hists = await pipe.execute()
    metrics = JobMetrics()
    for raw, value in ended.items():
        model, status = json.loads(_text(raw))
        metrics.jobs_ended[(model, status)] = int(value)
    for raw, value in opened.items():
        metrics.jobs_open[_text(raw)] = int(value)
    for raw, value in tokens.items():
        model, kind = json.loads(_text(raw))
        target = metrics.prompt_tokens if kind == "prompt" else metrics.completion_tokens
        target[model] = int(value)
    for histogram, raw_values in zip(HISTOGRAMS, hists, strict=True):
        metrics.histograms[histogram.name] = _histogram(histogram, raw_values)
    return metrics


def _histogram(histogram: Histogram, raw_values: dict[Any, Any]) -> dict[str, HistogramValues]:
    per_model: dict[str, dict[str, float]] = {}
    for raw, value in raw_values.items():
        model, bucket = json.loads(_text(raw))
        per_model.setdefault(model, {})[bucket] = float(value)
    out = {}
    for model, counts in per_model.items():
        running = 0.0
        cumulative = []
        for bound in [*(repr(b) for b in histogram.buckets), "+Inf"]:
            running += counts.get(bound, 0.0)
            cumulative.append((bound, running))
        out[model] = HistogramValues(cumulative, counts.get("sum", 0.0))
    return out


# -- engine load, per worker ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A worker's engine as it last reported: requests running and waiting in the engine
    (None: the engine does not say), KV-cache use (0..1; None where the engine has no such
    figure), and the jobs the worker holds (claimed and not ended), by the job's model (a
    LoRA adapter's jobs under the adapter's name)."""

    worker_id: str
    model: str
    engine: str
    running: int | None
    waiting: int | None
    kv_cache_usage: float | None
    jobs_in_flight: dict[str, int]

    def to_json(self) -> str:
        return json.dumps(asdict(self))


async def publish_engine_stats(redis: Redis, stats: EngineStats, ttl_seconds: float) -> None:
    """Write this worker's stats; they vanish `ttl_seconds` after the last write."""
    expires = time.time() + ttl_seconds
    pipe = redis.pipeline(transaction=False)
    pipe.set(f"{ENGINE_STATS_PREFIX}{stats.worker_id}", stats.to_json(), px=int(ttl_seconds * 1000))
    pipe.zadd(ENGINE_STATS_INDEX, {stats.worker_id: expires})
    await pipe.execute()


async def forget_engine_stats(redis: Redis, worker_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.delete(f"{ENGINE_STATS_PREFIX}{worker_id}")
    pipe.zrem(ENGINE_STATS_INDEX, worker_id)
    await pipe.execute()


async def read_engine_stats(redis: Redis) -> list[EngineStats]:
    """The live workers' stats (expired members are dropped from the index here)."""
    now = time.time()
    pipe = redis.pipeline(transaction=False)
    pipe.zremrangebyscore(ENGINE_STATS_INDEX, "-inf", now)
    pipe.zrange(ENGINE_STATS_INDEX, 0, -1)
    _, members = await pipe.execute()
    if not members:
        return []
    values = await redis.mget([f"{ENGINE_STATS_PREFIX}{_text(m)}" for m in members])
    return [EngineStats(**json.loads(v)) for v in values if v is not None]
