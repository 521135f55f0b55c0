"""The dispatcher: releases held interactive jobs to the workers, fairly across keys.

Sending every accepted job to its model's Celery queue at once would let one key's 10,000
jobs sit ahead of everybody else's. So interactive jobs are committed held (`queued`,
`enqueued_at` NULL) and the dispatcher keeps, per model, only a window of them out: the
live workers' engine slots times `dispatch_window_factor` (the part beyond the slots is a
backlog the engine refills from at once, so a wave of jobs ending does not leave it idle
for a round trip). Each pass fills the free room in weighted round-robin across keys: the
key with the fewest released-and-unfinished jobs relative to its `weight` goes next (ties:
the key whose oldest held job is oldest), taking its own jobs by priority, then age. A key
at its `max_concurrent_jobs` is skipped; its jobs wait. A key below its fair part of the
window (the window times its weight over the weights of the keys with work on the model)
may go beyond a full window by the difference: a key that arrives while another fills the
window does not wait for that key's jobs to end (bench/README.md, fairness).

A pass runs when a submit commits (so a lone job waits for no timer), when a worker says an
interactive job ended (JOB_WAKE_CHANNEL), and every `dispatch_interval_seconds`. SQL is the
source of truth: a pass holds PostgreSQL's advisory lock for its transaction, so API
replicas never overfill a window, and marks its jobs released in that transaction before
their messages go out; a message lost after that (Redis flushed, the process died) is the
reconciler's to send again, and a held job is never the reconciler's.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from api.core.db import Database
from api.core.limits import KeyLimits
from api.core.limits import stored_limits as parse_limits
from api.jobs.enqueue import JobQueue, QueuedJob
from storage.channels import JobWakeChannel
from storage.models import utcnow
from storage.registry import ModelRegistry, WorkerBeat
from storage.repositories import dispatch as dispatch_repo

log = logging.getLogger(__name__)
# A worker that does not announce its engine slots is taken to have this many.
_DEFAULT_SLOTS = 64
_WORKERS_CACHE_SECONDS = 1.0
_LIMITS_CACHE_SECONDS = 2.0
# Passes woken by job ends (not by submits) come at most this often: under a flood of short
# jobs each end would otherwise cost a pass, and the window's backlog covers the wait.
_MIN_GAP_SECONDS = 0.05
# ...and those woken by submits this often: a lone submit on an idle API passes at once,
# a flood of submits does not cost a pass per group commit.
_MIN_GAP_URGENT = 0.02


class Dispatcher:
    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        queue: JobQueue,
        redis: Redis,
        *,
        defaults: KeyLimits,
        window_factor: float,
        interval_seconds: float,
    ) -> None:
        self._db = db
        self._registry = registry
        self._queue = queue
        self._redis = redis
        self._defaults = defaults
        self._factor = window_factor
        self._interval = interval_seconds
        self._wake = asyncio.Event()
        # Woken by a submit (the shorter gap: a lone job must not wait), not by job ends.
        self._urgent = False
        self._tasks: list[asyncio.Task[None]] = []
        self._workers: dict[str, list[WorkerBeat]] = {}
        self._workers_at = -math.inf
        self._limits: dict[str, tuple[float, KeyLimits]] = {}
        self._one_pass = asyncio.Lock()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="dispatcher"),
            asyncio.create_task(self._listen(), name="dispatcher-wake"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    def wake(self) -> None:
        """Run a pass now (or as soon as the one running ends): jobs were submitted."""
        self._urgent = True
        self._wake.set()

    async def _run(self) -> None:
        last, took = -math.inf, 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            # A pass reads every held job: under a flood, passes that took long come less
            # often (about a quarter of the time spent passing), but at least 5 a second.
            least = min(max(_MIN_GAP_URGENT if self._urgent else _MIN_GAP_SECONDS, 3 * took), 0.2)
            gap = last + least - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._wake.clear()
            self._urgent = False
            last = time.monotonic()
            try:
                await self.dispatch_once()
            except Exception:
                log.exception("dispatch pass failed (the next one retries)")
            took = time.monotonic() - last

    async def _listen(self) -> None:
        while True:
            try:
                async with JobWakeChannel(self._redis).subscribe() as job_ids:
                    async for _ in job_ids:
                        self._wake.set()
            except asyncio.CancelledError:
                raise
            except RedisError:
                log.warning("dispatcher wake listener lost Redis; retrying")
                await asyncio.sleep(1)

    async def workers(self) -> dict[str, list[WorkerBeat]]:
        if time.monotonic() - self._workers_at > _WORKERS_CACHE_SECONDS:
            workers: dict[str, list[WorkerBeat]] = {}
            for beat in await self._registry.live_workers():
                workers.setdefault(beat.model, []).append(beat)
            self._workers, self._workers_at = workers, time.monotonic()
        return self._workers

    def window(self, workers: list[WorkerBeat]) -> int:
        """How many interactive jobs of a model may be out at once. A model with no live
        worker (all restarting) gets one default worker's window: a worker that comes back
        finds work queued at once."""
        beats = workers or [WorkerBeat("", "", "", 0, 0.0)]
        return sum(math.ceil((w.concurrency or _DEFAULT_SLOTS) * self._factor) for w in beats)

    async def dispatch_once(self) -> int:
        """One pass over every model; returns how many jobs were released."""
        async with self._one_pass:
            workers = await self.workers()
            async with self._db.transaction() as session:
                await dispatch_repo.lock_pass(session)
                held = await dispatch_repo.held(session)
                if not held:
                    return 0
                out = await dispatch_repo.released(session)
                owners = {h.owner_id for h in held} | {owner for _, owner in out}
                limits = await self._key_limits(session, owners)
                picks = self._plan(held, out, workers, limits)
                now = utcnow()
                jobs = [
                    job
                    for (owner, models), count in picks.items()
                    for job in await dispatch_repo.release(session, owner, models, count, now)
                ]
            # Committed: from here a lost message is the reconciler's to send again.
            self._queue.enqueue([QueuedJob(j.id, j.model, j.lane, j.priority) for j in jobs])
            return len(jobs)

    def _plan(
        self,
        held: list[dispatch_repo.Held],
        out: dict[tuple[str, str], int],
        workers: dict[str, list[WorkerBeat]],
        limits: dict[str, KeyLimits],
    ) -> dict[tuple[str, tuple[str, ...]], int]:
        """How many held jobs each key releases on each engine (a model and the LoRA
        adapters it serves share its workers, so they share its window)."""
        base = {a: model for model, beats in workers.items() for b in beats for a in b.adapters}
        # Per engine: each key's held count and oldest held job there, and its models.
        engines: dict[str, dict[str, tuple[int, str]]] = {}
        models_of: dict[str, set[str]] = {}
        for h in held:
            engine = base.get(h.model, h.model)
            models_of.setdefault(engine, set()).add(h.model)
            count, oldest = engines.setdefault(engine, {}).get(h.owner_id, (0, h.oldest))
            engines[engine][h.owner_id] = (count + h.count, min(oldest, h.oldest))
        # Released and unfinished: per key on each engine (its share), and in all (its cap).
        running: dict[tuple[str, str], int] = {}
        total: dict[str, int] = {}
        for (model, owner), n in out.items():
            engine = base.get(model, model)
            running[engine, owner] = running.get((engine, owner), 0) + n
            total[owner] = total.get(owner, 0) + n
        picks: dict[tuple[str, tuple[str, ...]], int] = {}
        for engine, owners in engines.items():
            window = self.window(workers.get(engine, []))
            out_here = {o: n for (e, o), n in running.items() if e == engine}
            room = window - sum(out_here.values())
            # A key's fair part of the window, by weight among the keys with work here. A
            # key below it may go over the window by the difference: a key that just
            # arrived need not wait for another key's jobs to end (at most twice the window
            # is out then).
            weights = {o: limits[o].weight or 1 for o in {*owners, *out_here}}
            per_weight = window / sum(weights.values())
            heap = [
                (out_here.get(o, 0) / weights[o], oldest, o) for o, (_, oldest) in owners.items()
            ]
            heapq.heapify(heap)
            left = {o: count for o, (count, _) in owners.items()}
            given: dict[str, int] = {}
            while heap:
                ratio, oldest, owner = heapq.heappop(heap)
                if room <= 0 and ratio + 1 / weights[owner] > per_weight:
                    continue  # the window is full and this key has its part
                cap = limits[owner].max_concurrent_jobs
                if cap is not None and total.get(owner, 0) >= cap:
                    continue  # at its limit: its jobs wait for one of its own to end
                given[owner] = given.get(owner, 0) + 1
                total[owner] = total.get(owner, 0) + 1
                left[owner] -= 1
                room -= 1
                if left[owner] > 0:
                    ratio = (out_here.get(owner, 0) + given[owner]) / weights[owner]
                    heapq.heappush(heap, (ratio, oldest, owner))
            models = tuple(sorted(models_of[engine]))
            for owner, n in given.items():
                picks[owner, models] = picks.get((owner, models), 0) + n
        return picks

    async def _key_limits(self, session: AsyncSession, owners: set[str]) -> dict[str, KeyLimits]:
        """Each key's effective limits (its own over the defaults), cached briefly."""
        now = time.monotonic()
        stale = [
            o
            for o in owners
            if o not in self._limits or now - self._limits[o][0] > _LIMITS_CACHE_SECONDS
        ]
        if stale:
            stored = await dispatch_repo.stored_limits(session, stale)
            for owner in stale:
                self._limits[owner] = (now, parse_limits(stored.get(owner)).over(self._defaults))
        return {o: self._limits[o][1] for o in owners}
