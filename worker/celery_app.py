"""The Celery app workers run: Redis broker, late acks, threads pool, per-model queues.

The API does not import this module: it sends `storage.keys.RUN_JOBS_TASK` by name with
the same broker settings (storage.broker).
"""

from __future__ import annotations

from celery import Celery

from storage.broker import celery_conf
from storage.settings import get_storage_settings


def create_celery() -> Celery:
    app = Celery("ferry", broker=get_storage_settings().redis_url, include=["worker.tasks"])
    app.conf.update(celery_conf())
    return app


app = create_celery()
