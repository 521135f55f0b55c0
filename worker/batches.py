"""Batch lines on the worker side.

A batch line is an ordinary job on its model's bulk queue; this task runs it exactly like
`ferry.run_job` (claim, generate at bulk priority, record) and then says on
`BATCH_WAKE_CHANNEL` that a bulk slot came free, so the API's batch feeder sends the next
line at once instead of at its next timed pass.

Expansion (lines -> jobs) and finalisation (jobs -> output files) run in the API
(api/batches): they validate with the API's wire types and image intake, which workers
never import, and their state lives in SQL, so any API process can take them over.
"""

from __future__ import annotations

import logging
import threading

import redis

from storage.keys import BATCH_WAKE_CHANNEL, RUN_BULK_JOB_TASK
from storage.settings import get_storage_settings
from worker.celery_app import app

log = logging.getLogger(__name__)
_client: redis.Redis | None = None
_client_lock = threading.Lock()


def _redis() -> redis.Redis:
    global _client
    with _client_lock:
        if _client is None:
            _client = redis.Redis.from_url(get_storage_settings().redis_url)
        return _client


@app.task(name=RUN_BULK_JOB_TASK)  # type: ignore[untyped-decorator]
def run_bulk_job(job_id: str) -> str:
    from worker.tasks import get_runner  # worker.tasks imports this module

    outcome = get_runner().run_job(job_id)
    try:
        _redis().publish(BATCH_WAKE_CHANNEL, job_id)
    except redis.RedisError:
        log.warning("could not wake the batch feeder (it will pass on its timer)")
    log.info("bulk job %s: %s", job_id, outcome)
    return outcome
