"""Every Redis key, channel, Celery task and queue name Ferry uses, in one place."""

from __future__ import annotations

from enum import StrEnum


class Lane(StrEnum):
    """A job's Celery lane (stored in `jobs.lane`; part of its queue's name)."""

    INTERACTIVE = "interactive"  # sent to the API by a client, streamed as it generates
    BULK = "bulk"  # a batch line, fed a window at a time by the batch feeder

# Celery task the API enqueues by name (the API never imports worker/).
RUN_JOB_TASK = "ferry.run_job"
# Interactive jobs that reached the API together (a burst), several per message (args: a
# list of job ids), each run exactly as RUN_JOB_TASK. A worker's Celery consumer takes one
# message at a time, with two Redis round trips each; on a busy machine that spread a
# burst of 64 jobs' starts over seconds (api/enqueue.py says how jobs are grouped).
RUN_JOBS_TASK = "ferry.run_jobs"

# Batch lines run through this task, several per message (args: a list of job ids): each
# the same run as RUN_JOB_TASK, then a word on BATCH_WAKE_CHANNEL so the batch feeder
# refills the bulk window at once. One message per line cost more CPU than the line's own
# bookkeeping (a Celery message is a push, a pop and two Redis transactions).
RUN_BULK_JOBS_TASK = "ferry.run_bulk_jobs"
# The one-line form earlier versions sent; workers still run it.
RUN_BULK_JOB_TASK = "ferry.run_bulk_job"

# Workers publish here (payload: the job id) when a batch line ends; API processes listen.
BATCH_WAKE_CHANNEL = "ferry:batches:wake"

# Held by the API process doing a batch supervisor pass (expand, feed, expire, finalise).
BATCH_SUPERVISOR_LOCK = "ferry:batches:lock"

# Sorted set of job ids whose Celery message has been sent and not yet claimed
# (score = send time). If Redis loses it, the reconciler knows to send again.
PENDING_JOBS = "ferry:jobs:pending"

# Held by the API process doing a reconciler pass (short expiry).
RECONCILER_LOCK = "ferry:reconciler:lock"

# Channel on which the API asks workers to abort a running job (payload: job id).
CANCEL_CHANNEL = "ferry:cancel"

# Model registry: hash model name -> ModelInfo JSON (kept across worker restarts),
# and one expiring key per live worker.
MODELS_HASH = "ferry:models"
WORKER_KEY_PREFIX = "ferry:worker:"


def job_stream(job_id: str) -> str:
    """Redis Stream holding a job's events (replay source)."""
    return f"ferry:job:{job_id}:events"


def job_channel(job_id: str) -> str:
    """Pub/sub channel carrying a job's events live."""
    return f"ferry:job:{job_id}:live"


def worker_key(worker_id: str) -> str:
    return f"{WORKER_KEY_PREFIX}{worker_id}"


def queue_name(model: str, lane: Lane) -> str:
    """Celery queue for a model's interactive or bulk work."""
    return f"{model}.{lane}"
