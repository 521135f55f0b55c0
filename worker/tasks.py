"""Thin Celery tasks: take a job id, hand it to the process's runner."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Any

from celery.signals import worker_init, worker_shutdown

from storage.keys import RUN_JOB_TASK, RUN_JOBS_TASK
from storage.settings import get_storage_settings
from worker import batches  # noqa: F401  (registers the bulk tasks)
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


@app.task(name=RUN_JOB_TASK)  # type: ignore[untyped-decorator]
def run_job(job_id: str) -> str:
    outcome = get_runner().run_job(job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome


@app.task(name=RUN_JOBS_TASK)  # type: ignore[untyped-decorator]
def run_jobs(job_ids: list[str]) -> list[str]:
    """Interactive jobs sent in one message (a burst): run side by side, as run_job."""
    outcomes = get_runner().run_jobs(job_ids)
    log.info("jobs %s: %s", ",".join(job_ids), ",".join(outcomes))
    return outcomes
