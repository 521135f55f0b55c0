"""The API's lifespan on real PostgreSQL and Redis: a start-up that fails halfway stops
what it had already started."""

from __future__ import annotations

import asyncio
import threading

import pytest
from redis import Redis

from api.app import create_app
from api.batches.supervisor import BatchSupervisor
from api.core.settings import ApiSettings
from storage.settings import StorageSettings
from tests.conftest import KEY_A, KEY_B, REDIS_BASE

pytestmark = pytest.mark.timeout(120)

_LOOPS = {"job-intake", "event-hub-reader", "reconciler"}


async def test_a_failed_start_up_stops_what_it_started(
    migrated_pg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis_url = f"{REDIS_BASE}/10"  # no test stack uses db 10
    Redis.from_url(redis_url).flushdb()
    storage = StorageSettings(database_url=migrated_pg, redis_url=redis_url)
    app = create_app(ApiSettings(api_keys=[KEY_A, KEY_B]), storage)

    def fail(self: BatchSupervisor) -> None:
        raise RuntimeError("supervisor could not start")

    # The last step of start-up: everything before it is running by then.
    monkeypatch.setattr(BatchSupervisor, "start", fail)
    # Other tests' in-process apps may run on the same loop: only this app's tasks count.
    before, threads_before = asyncio.all_tasks(), set(threading.enumerate())
    with pytest.raises(RuntimeError, match="supervisor could not start"):
        async with app.router.lifespan_context(app):
            pass
    await asyncio.sleep(0)  # let the cancelled loops finish cancelling
    running = {t.get_name() for t in asyncio.all_tasks() - before if not t.done()}
    assert not running & _LOOPS, running
    assert not any(
        t.name == "job-queue" and t.is_alive() for t in set(threading.enumerate()) - threads_before
    )
