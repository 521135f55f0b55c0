"""Every Redis key, channel, Celery task and queue name Ferry uses, in one place.

Only storage/ reads and writes the Redis structures: each has one owner (`events.py`,
`registry.py`, `pending.py`, `channels.py`, `locks.py`, `job_metrics.py`) that every
caller goes through.
"""

from __future__ import annotations

from enum import StrEnum


class Lane(StrEnum):
    """A job's Celery lane (stored in `jobs.lane`; part of its queue's name)."""

    INTERACTIVE = "interactive"  # sent to the API by a client, streamed as it generates
    BULK = "bulk"  # a batch line, fed a window at a time by the batch feeder


# The one Celery task the API sends by name (the API never imports worker/): args, a list
# of job ids of one model, lane and priority. Interactive jobs and batch lines alike: the
# worker reads each job's lane from its row. Several jobs share a message because a
# worker's consumer takes one message at a time, each a push, a pop and two Redis
# transactions: one per job spread a 64-job burst's starts over seconds and cost batch
# lines more CPU than their own bookkeeping (api/jobs/enqueue.py says how jobs are grouped).
RUN_JOBS_TASK = "ferry.run_jobs"

# Older APIs sent these; workers run them one more release for a rolling upgrade.
LEGACY_RUN_JOB_TASK = "ferry.run_job"
LEGACY_RUN_BULK_JOBS_TASK = "ferry.run_bulk_jobs"

# Workers publish here (payload: the job id) when a batch line ends; API processes listen.
BATCH_WAKE_CHANNEL = "ferry:batches:wake"
# A worker says an interactive job ended: the API's dispatcher fills the freed slot.
JOB_WAKE_CHANNEL = "ferry:jobs:wake"

# Held by the API process doing a batch supervisor pass (expand, feed, expire, finalise).
BATCH_SUPERVISOR_LOCK = "ferry:batches:lock"

# Held by the API process doing a retention sweep (expires after one interval, renewed
# while the sweep runs).
RETENTION_LOCK = "ferry:retention:lock"

# Sorted set of job ids whose Celery message has been sent and not yet claimed
# (score = send time). If Redis loses it, the reconciler knows to send again.
PENDING_JOBS = "ferry:jobs:pending"

# Held by the API process doing a reconciler pass (short expiry).
RECONCILER_LOCK = "ferry:reconciler:lock"

# Taken (and left to expire) by the API process that corrects the open-job counts of
# /metrics from SQL: once per FERRY_METRICS_RESYNC_SECONDS across all processes.
METRICS_RESYNC_LOCK = "ferry:metrics:resync"

# Held by the API process doing an expiry sweep (jobs past their deadline; short expiry).
EXPIRY_LOCK = "ferry:expiry:lock"

# Channel on which the API asks workers to abort a running job (payload: job id).
CANCEL_CHANNEL = "ferry:cancel"

# Model registry: hash model name -> ModelInfo JSON (kept across worker restarts); the
# live workers, a sorted set of worker ids scored by when their last heartbeat expires
# (Redis TIME) beside a hash of their beats; and per model when its last beat expires
# (the start of its grace period once its workers are gone). Never found by SCAN.
MODELS_HASH = "ferry:models"
WORKERS_LIVE = "ferry:workers"
WORKER_BEATS = "ferry:workers:beats"
MODELS_SEEN = "ferry:models:seen"

# Cluster-wide job metrics (storage/job_metrics.py): hashes of counters, and each
# worker's engine stats (an expiring key per worker, indexed by a sorted set).
JOB_METRICS_PREFIX = "ferry:metrics:"
ENGINE_STATS_INDEX = "ferry:engine-stats"
ENGINE_STATS_PREFIX = "ferry:engine-stats:"


def job_stream(job_id: str) -> str:
    """Redis Stream holding a job's events (replay source)."""
    return f"ferry:job:{job_id}:events"


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying a job's events live."""
    return f"ferry:job:{job_id}:live"


def queue_name(model: str, lane: Lane) -> str:
    """Celery queue for a model's interactive or bulk work."""
    return f"{model}.{lane}"
