"""The batch supervisor: one loop per API process that moves batches along.

Every step keeps its state in SQL and is safe to repeat, so any API process can take over
from one that died (see the modules it calls):
- expansion (`expansion.py`) — the creating process starts it at once; a batch still
  `validating` after its holder's lease lapsed is taken over here;
- expiry — a batch past its completion window drops its queued lines, aborts running ones,
  and ends `expired` with what finished;
- feeding (`feeder.py`) — batch lines go to the bulk queue a window at a time;
- finalisation (`output.py`) — a batch none of whose lines is open gets its files.

Passes are serialised across API processes by a short Redis lock. Workers wake the loop
when a batch line ends, and then it feeds and finalises what is ready; the other steps
run on a timer (`batch_feed_interval_seconds`). A deployment expires and finalises only
the batches of models its registry knows: deployments that share a database but not
Redis and object storage (test suites do) then never write each other's files into the
wrong bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import LockError, RedisError

from api.batches.expansion import expand_batch
from api.batches.feeder import BatchFeeder
from api.batches.output import finalize_batch
from api.batches.service import count_cancelled
from api.core.state import AppState
from storage.channels import BatchWakeChannel, CancelChannel
from storage.locks import batch_supervisor_lock
from storage.repositories import batch_jobs as batch_jobs_repo
from storage.repositories import batches as batches_repo

log = logging.getLogger(__name__)
# Wakes come as often as lines end (hundreds a second): passes are at least this far apart.
_MIN_GAP_SECONDS = 0.05
_LIMIT = 100
_STOP_SECONDS = 5.0
# Writing a batch's files takes seconds; a finalisation cut short is retried after this.
_FINALIZE_LEASE_SECONDS = 120.0


class BatchSupervisor:
    def __init__(self, state: AppState) -> None:
        self._state = state
        settings = state.settings
        self._interval = settings.batch_feed_interval_seconds
        self._lease = settings.batch_expand_lease_seconds
        self._feeder = BatchFeeder(
            state.db,
            state.registry,
            state.queue,
            cooldown_seconds=settings.batch_interactive_cooldown_seconds,
        )
        self._wake = asyncio.Event()
        # A model's lines wait for a live worker: one that appears is fed at once.
        state.registry.on_new_worker(self.wake)
        self._full_due = True
        self._tasks: list[asyncio.Task[None]] = []
        # Expansions and finalisations this process is running, by batch id.
        self._busy: dict[str, asyncio.Task[None]] = {}

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="batch-supervisor"),
            asyncio.create_task(self._listen(), name="batch-wake-listener"),
        ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._busy.values()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        # Bounded: a pub/sub teardown has been seen to wait forever on the connection
        # pool at shutdown, and a stopping process must not hang on it.
        done, stuck = await asyncio.wait(tasks, timeout=_STOP_SECONDS)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: it ended with the process, nothing to report
        if stuck:
            log.warning("batch supervisor: %d tasks still stopping; leaving them", len(stuck))

    def wake(self, *, full: bool = False) -> None:
        """Feed now; `full` also runs the timed steps (expiry, finalisation)."""
        self._full_due = self._full_due or full
        self._wake.set()

    def expand_soon(self, batch_id: str) -> None:
        """Start expanding a batch this process has just created (it holds the lease)."""
        self._spawn(batch_id, self._expand(batch_id))

    async def _expand(self, batch_id: str) -> None:
        await expand_batch(self._state, batch_id)
        self.wake(full=True)

    def _spawn(self, batch_id: str, work: Coroutine[Any, Any, None]) -> None:
        if batch_id in self._busy:
            work.close()
            return
        task = asyncio.create_task(work, name=f"batch-{batch_id}")
        self._busy[batch_id] = task

        def done(t: asyncio.Task[None]) -> None:
            self._busy.pop(batch_id, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("batch %s step failed", batch_id, exc_info=t.exception())

        task.add_done_callback(done)

    async def _run(self) -> None:
        last_full = 0.0
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancel that
            # lands as the wake arrives, and stop() then waits on this task for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            full = self._full_due or time.monotonic() - last_full >= self._interval
            if full:
                self._full_due, last_full = False, time.monotonic()
            try:
                await self._locked_pass(full)
            except Exception:
                log.exception("batch supervisor pass failed")
            await asyncio.sleep(_MIN_GAP_SECONDS)

    async def _locked_pass(self, full: bool) -> None:
        # No open batch anywhere (the usual state of an interactive deployment): one
        # indexed query instead of a lock and a query per step, every interval.
        async with self._state.db.read() as session:
            if not await batches_repo.any_open(session):
                return
        lock = batch_supervisor_lock(self._state.redis, timeout=max(5.0, self._interval * 5))
        if not await lock.acquire():
            return
        try:
            await self.pass_once(full=full)
        finally:
            with contextlib.suppress(LockError):
                await lock.release()

    async def pass_once(self, *, full: bool = True) -> None:
        if full:
            await self._take_over_expansions()
            await self._expire()
        await self._feeder.feed_once()
        # Any line's end may be its batch's last: look at once (one indexed query) rather
        # than on the next timed pass, up to `batch_feed_interval_seconds` later.
        await self._finalize_ready()

    async def _take_over_expansions(self) -> None:
        db = self._state.db
        async with db.read() as session:
            stale = await batches_repo.unclaimed_validating(session, _LIMIT)
        for batch_id in stale:
            if batch_id in self._busy:
                continue
            async with db.transaction() as session:
                claimed = await batches_repo.claim_expansion(session, batch_id, self._lease)
            if claimed:
                log.warning("taking over the expansion of batch %s", batch_id)
                self._spawn(batch_id, self._expand(batch_id))

    async def _ours(self, batches: list[tuple[str, str | None]]) -> list[str]:
        """The batches this deployment looks after: those of models its registry knows (a
        batch of several models has none: anyone's)."""
        if not batches:
            return []
        known = await self._state.registry.models()
        return [batch_id for batch_id, model in batches if model is None or model in known]

    async def _expire(self) -> None:
        state = self._state
        async with state.db.read() as session:
            due = await self._ours(await batches_repo.past_window(session, _LIMIT))
        for batch_id in due:
            async with state.db.transaction() as session:
                if not await batches_repo.begin_expiry(session, batch_id):
                    continue
                cancelled = await batch_jobs_repo.cancel_open_jobs(session, batch_id)
            await count_cancelled(state.redis, batch_id, cancelled)
            running = cancelled.running
            log.info("batch %s expired; aborting %d running lines", batch_id, len(running))
            cancels = CancelChannel(state.redis)
            for job_id in running:
                await cancels.publish(job_id)

    async def _finalize_ready(self) -> None:
        db = self._state.db
        async with db.read() as session:
            ready = await self._ours(await batches_repo.ready_to_finalize(session, _LIMIT))
        for batch_id in ready:
            if batch_id in self._busy:
                continue
            async with db.transaction() as session:
                claimed = await batches_repo.claim_settling(
                    session, batch_id, _FINALIZE_LEASE_SECONDS
                )
            if claimed:
                self._spawn(batch_id, self._finalize(batch_id))

    async def _finalize(self, batch_id: str) -> None:
        final = await finalize_batch(self._state.db, self._state.objects, batch_id)
        if final is not None:
            log.info("batch %s %s", batch_id, final)

    async def _listen(self) -> None:
        while True:
            try:
                async with BatchWakeChannel(self._state.redis).subscribe() as job_ids:
                    async for _ in job_ids:
                        self.wake()
            except asyncio.CancelledError:
                raise
            except RedisError:
                log.warning("batch wake listener lost Redis; retrying")
                await asyncio.sleep(1)
