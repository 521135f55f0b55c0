"""Engine admission: how many bulk (batch) jobs may be inside the engine at once.

A worker runs `concurrency` jobs in its engine (vLLM's `max_num_seqs`). It takes up to
`bulk_window` batch lines at once: as many as may be in the engine plus `bulk_backlog`
claimed lines waiting *here*, at this gate, so the moment a line ends the next one enters
the engine: refilling through the feeder (a wake message, SQL, a Celery message) takes a
round trip the engine would otherwise spend with empty slots. Its task threads are
`concurrency + bulk_window` (WorkerSettings.task_threads): batch lines never hold the
threads interactive jobs need.

The gate also keeps room for interactive jobs. Bulk jobs may fill `bulk_slots` of the
engine's slots (`bulk_share` of them) while the worker has no interactive job; while it
has one (and for `interactive_cooldown_seconds` after the last one ended) only
`bulk_slots_busy` (`bulk_share_busy` of them),
so the engine drains to a small, fast batch and interactive first tokens stay quick.
Lowering the limit aborts nothing: running lines finish, and no new one enters until the
bulk count is under the limit. Interactive jobs are never held here; beyond the engine's
slots they wait in the engine's own queue, ahead of bulk ones (engine priority).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from worker.errors import WorkerStopping


class EngineAdmission:
    def __init__(
        self,
        *,
        idle_limit: int,
        busy_limit: int,
        cooldown_seconds: float,
    ) -> None:
        self.idle_limit = idle_limit
        self.busy_limit = busy_limit
        self._cooldown = cooldown_seconds
        self._bulk = 0
        self._interactive = 0
        self._busy_until = 0.0
        # One timer at a time wakes the waiters when the cooldown ends (not one per job).
        self._cooldown_timer: asyncio.TimerHandle | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False

    @property
    def bulk_in_engine(self) -> int:
        return self._bulk

    @property
    def bulk_limit(self) -> int:
        busy = self._interactive > 0 or time.monotonic() < self._busy_until
        return self.busy_limit if busy else self.idle_limit

    @contextlib.asynccontextmanager
    async def interactive(self) -> AsyncIterator[None]:
        """Around an interactive job's time in the engine: bulk narrows meanwhile."""
        self._interactive += 1
        try:
            yield
        finally:
            self._interactive -= 1
            self._busy_until = time.monotonic() + self._cooldown
            if self._cooldown_timer is None:
                self._cooldown_timer = asyncio.get_running_loop().call_later(
                    self._cooldown, self._cooldown_over
                )

    def _cooldown_over(self) -> None:
        """The limit rises again when the cooldown ends: wake the waiters then (or look
        again later, if another interactive job pushed the end back)."""
        remaining = self._busy_until - time.monotonic()
        self._cooldown_timer = None
        if remaining > 0:
            self._cooldown_timer = asyncio.get_running_loop().call_later(
                remaining, self._cooldown_over
            )
        else:
            self.wake()

    @contextlib.asynccontextmanager
    async def bulk(self, give_up: Callable[[], bool]) -> AsyncIterator[bool]:
        """Around a bulk job's time in the engine; waits for a slot first, in arrival
        order. Yields False (and takes no slot) when `give_up()` became true meanwhile
        (the job was cancelled); call `wake()` after making it true."""
        while not self._closed and not give_up() and self._bulk >= self.bulk_limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self._closed:
            raise WorkerStopping("the worker is stopping")
        if give_up():
            yield False
            return
        self._bulk += 1
        try:
            yield True
        finally:
            self._bulk -= 1
            self.wake()

    def wake(self) -> None:
        """Let waiting bulk jobs look again (a slot came free, the limit rose, a job was
        cancelled). The first in line that finds room takes it."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """The worker is stopping: jobs still waiting give up (and are released)."""
        self._closed = True
        self.wake()
