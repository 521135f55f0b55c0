"""The worker's one Celery task: take a message's job ids, hand them to the process's runner.

Interactive jobs and batch lines travel the same way; the runner reads each job's lane
from its row (priority, admission gate, and the batch feeder's wake when a line ends).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

from celery.signals import worker_init, worker_shutdown

from storage.keys import LEGACY_RUN_BULK_JOBS_TASK, LEGACY_RUN_JOB_TASK, RUN_JOBS_TASK
from storage.settings import get_storage_settings
from worker.celery_app import app
from worker.engines import build_engine
from worker.errors import StartupError
from worker.runner import JobRunner
from worker.settings import get_worker_settings

log = logging.getLogger(__name__)
_runner: JobRunner | None = None


def get_runner() -> JobRunner:
    if _runner is None:
        raise RuntimeError("the worker's runner is not started")
    return _runner


@worker_init.connect  # type: ignore[untyped-decorator]
def _start_runner(**_: Any) -> None:
    """Load the one engine before the worker takes its first message."""
    global _runner
    _runner = JobRunner(get_worker_settings(), get_storage_settings(), build_engine)
    try:
        _runner.start()
    except StartupError as exc:
        # A bad flag or model: its reason is all the operator needs.
        print(f"ferry worker: cannot start: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    except BaseException:
        # Celery swallows (and, before its logging is set up, hides) what a worker_init
        # handler raises, and would carry on as a worker with no engine, taking messages it
        # can never run. Exit instead, loudly, so the supervisor (or test) sees the failure.
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _stop_runner(**_: Any) -> None:
    # Without this the engine's loop thread would keep the process alive past SIGTERM.
    if _runner is not None:
        _runner.stop()


def _run(job_ids: list[str]) -> list[str]:
    outcomes = get_runner().run_jobs(job_ids)
    log.info("jobs %s: %s", ",".join(job_ids), ",".join(outcomes))
    return outcomes


@app.task(name=RUN_JOBS_TASK)  # type: ignore[untyped-decorator]
def run_jobs(job_ids: list[str]) -> list[str]:
    """The jobs of one message (one model, lane and priority): run side by side."""
    return _run(job_ids)


# Messages an older API queued before a rolling upgrade (storage/keys.py); drop next release.
@app.task(name=LEGACY_RUN_JOB_TASK)  # type: ignore[untyped-decorator]
def legacy_run_job(job_id: str) -> str:
    return _run([job_id])[0]


@app.task(name=LEGACY_RUN_BULK_JOBS_TASK)  # type: ignore[untyped-decorator]
def legacy_run_bulk_jobs(job_ids: list[str]) -> list[str]:
    return _run(job_ids)
