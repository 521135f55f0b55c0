"""Batch lines on the worker side.

A batch line is an ordinary job on its model's bulk queue, several to a Celery message
(`ferry.run_bulk_jobs`). Each runs exactly like `ferry.run_job` (claim, wait at the
admission gate, generate at bulk priority, record), all at once in the runner; as each
ends the runner says on `BATCH_WAKE_CHANNEL` that a bulk slot came free, so the API's batch
feeder sends the next lines at once instead of at its next timed pass.

Expansion (lines -> jobs) and finalisation (jobs -> output files) run in the API
(api/batches): they validate with the API's wire types and image intake, which workers
never import, and their state lives in SQL, so any API process can take them over.
"""

from __future__ import annotations

import logging

from storage.keys import RUN_BULK_JOB_TASK, RUN_BULK_JOBS_TASK
from worker.celery_app import app

log = logging.getLogger(__name__)


@app.task(name=RUN_BULK_JOBS_TASK)  # type: ignore[untyped-decorator]
def run_bulk_jobs(job_ids: list[str]) -> list[str]:
    from worker.tasks import get_runner  # worker.tasks imports this module

    outcomes = get_runner().run_bulk_jobs(job_ids)
    log.info("bulk jobs %s: %s", ",".join(job_ids), ",".join(outcomes))
    return outcomes


@app.task(name=RUN_BULK_JOB_TASK)  # type: ignore[untyped-decorator]
def run_bulk_job(job_id: str) -> str:
    """The one-line message earlier API versions sent."""
    outcome: str = run_bulk_jobs([job_id])[0]
    return outcome
