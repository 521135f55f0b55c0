"""The runner: one asyncio loop thread and ONE engine per worker process.

Celery runs tasks on a pool of threads (`--pool threads`); each task thread hands its job
to this loop with `run_coroutine_threadsafe` and blocks until the job ends. So every job in
flight on this worker is inside the same engine at once, and the engine batches them
continuously, batch lines through the admission gate (worker/admission.py) that keeps
slots for interactive jobs. Beside the jobs, the loop runs the worker's housekeeping:
heartbeat, lease renewal (which also notices jobs cancelled while the cancel message was
missed), the cancel listener, and the event publisher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop
from redis.asyncio import Redis
from redis.exceptions import RedisError

from storage import telemetry
from storage.channels import BatchWakeChannel, CancelChannel, JobWakeChannel
from storage.db import create_db_engine, create_session_factory
from storage.events import JobEventStream
from storage.job_metrics import EngineStats, forget_engine_stats, publish_engine_stats
from storage.models import JobStatus
from storage.objects import get_object_store
from storage.pending import PendingJobs
from storage.ratelimit import RateLimiter
from storage.registry import ModelRegistry, ServedModel, WorkerBeat, now_epoch
from storage.repositories import jobs as jobs_repo
from storage.settings import StorageSettings
from worker.admission import EngineAdmission
from worker.attempt import AttemptContext, announce_expired, run_claimed
from worker.engines.base import Engine, ReportsLoad
from worker.errors import EngineBroken, StartupError
from worker.group_commit import claim_committer, outcome_committer
from worker.job_state import JobAttempt
from worker.publisher import EventPublisher
from worker.settings import WorkerSettings
from worker.tool_calls import load_parser

log = logging.getLogger(__name__)
T = TypeVar("T")


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        storage: StorageSettings,
        engine_factory: Callable[[WorkerSettings], Engine],
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.worker_id = new_worker_id()
        self._engine_factory = engine_factory
        # uvloop, as vLLM's own server runs AsyncLLM: every engine step wakes each running
        # job's coroutine and the event publisher, so the loop's own overhead is paid per
        # token (asyncio's is a large share of this thread's time: bench/README.md).
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ferry-runner", daemon=True
        )
        self._in_flight: dict[str, JobAttempt] = {}
        self._admission = EngineAdmission(
            idle_limit=settings.bulk_slots,
            busy_limit=settings.bulk_slots_busy,
            cooldown_seconds=settings.interactive_cooldown_seconds,
        )
        self._background: list[asyncio.Task[None]] = []
        self._jobs: set[asyncio.Task[Any]] = set()
        self._stopped = False

    # -- lifecycle, called from Celery's threads -------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._call(self._start())  # a failure ends the process: see worker/tasks.py
        log.info(
            "worker %s serving %s on %s",
            self.worker_id,
            self.settings.model_name,
            self.settings.engine,
        )

    def stop(self) -> None:
        if self._stopped or not self._thread.is_alive():
            return
        self._stopped = True
        try:
            self._call(self._stop(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def run_jobs(self, job_ids: list[str]) -> list[str]:
        """Run the jobs that came in one message together; block the calling (Celery task)
        thread until all have ended. A job whose attempt raised was given back to the queue
        (see attempt.py): its outcome is `released`."""
        return self._call(self._run_jobs(job_ids))

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- on the loop -------------------------------------------------------------------

    async def _start(self) -> None:
        self._db = create_db_engine(self.storage)
        self._sessions = create_session_factory(self._db)
        self._redis = Redis.from_url(self.storage.redis_url)
        self._pending = PendingJobs(self._redis)
        self._batch_wake = BatchWakeChannel(self._redis)
        self._job_wake = JobWakeChannel(self._redis)
        self._publisher = EventPublisher(
            JobEventStream(
                self._redis,
                maxlen=self.storage.event_stream_maxlen,
                ttl_seconds=self.storage.event_stream_ttl_seconds,
            )
        )
        self._publisher.start()
        # One object store per process (boto3's client is thread-safe); building an S3 one
        # checks the bucket over the network, so off the loop.
        self._objects = await asyncio.to_thread(get_object_store)
        self.engine = self._engine_factory(self.settings)
        await self.engine.start()
        try:
            tool_parser = await asyncio.to_thread(
                load_parser, self.settings.tool_call_parser, self.engine.tokenizer
            )
        except StartupError:
            await self.engine.stop()  # no engine process may outlive the refusal
            raise
        # The model's libraries leave millions of long-lived objects; without this every
        # full garbage collection walks them all, stalling the loop (and each job) for
        # tens of milliseconds, many times a second under load.
        gc.freeze()
        s = self.settings
        self._claims = claim_committer(self._sessions, self.worker_id, s.lease_seconds)
        self._outcomes = outcome_committer(self._sessions, self.worker_id)
        self._claims.start()
        self._outcomes.start()
        self._ctx = AttemptContext(
            worker_id=self.worker_id,
            engine=self.engine,
            sessions=self._sessions,
            publisher=self._publisher,
            claims=self._claims,
            outcomes=self._outcomes,
            bulk_priority=s.bulk_priority,
            max_attempts=s.max_attempts,
            in_flight=self._in_flight,
            admission=self._admission,
            objects=self._objects,
            adapters=frozenset(m.name for m in s.lora_modules),
            tool_parser=tool_parser,
            limiter=RateLimiter(self._redis),
            metrics=self._redis,
        )
        self._registry = ModelRegistry(self._redis)
        await self._heartbeat_once()
        await self._engine_stats_once()
        for loop_fn in (
            self._heartbeat_loop,
            self._engine_stats_loop,
            self._lease_loop,
            self._cancel_listener,
        ):
            self._background.append(asyncio.create_task(loop_fn(), name=loop_fn.__name__))

    async def _stop(self) -> None:
        for task in self._background:
            task.cancel()
        self._admission.close()
        for state in list(self._in_flight.values()):
            await self.engine.abort(state.request_id)
        # Jobs stopped here go back to the queue (attempt.py): let them say so in SQL.
        if self._jobs:
            await asyncio.wait(self._jobs, timeout=5)
        await self._outcomes.stop()
        await self._claims.stop()
        await self._publisher.stop()
        await self._registry.forget_worker(self.worker_id)
        try:
            await forget_engine_stats(self._redis, self.worker_id)
        except RedisError:
            log.warning("could not remove this worker's engine stats (they expire)")
        await self.engine.stop()
        await self._redis.aclose()
        await self._db.dispose()

    async def _tracked(self, attempt: Coroutine[Any, Any, str]) -> str:
        """Run one attempt as a job of this runner (`_stop` waits for them)."""
        task = asyncio.current_task()
        assert task is not None
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        try:
            return await attempt
        except EngineBroken:
            log.critical(
                "the engine is broken; stopping this worker so a healthy one (or a "
                "restarted one) takes its jobs",
                exc_info=True,
            )
            # Celery's warm shutdown: no new messages; worker_shutdown stops the runner.
            os.kill(os.getpid(), signal.SIGTERM)
            return "released"

    async def _run_jobs(self, job_ids: list[str]) -> list[str]:
        """The jobs of one message are claimed together (one statement), then run side
        by side. As each batch line (lane `bulk`, on the job's row) ends, a word on
        BATCH_WAKE_CHANNEL tells the API's batch feeder a bulk slot came free, so it sends
        the next lines at once instead of at its next timed pass."""
        got = await asyncio.gather(*(self._claims.submit(job_id) for job_id in job_ids))
        claimed = {job.id: job for job in got if job is not None}
        # Delivered: from here on the claimed jobs' leases guard them.
        try:
            await self._pending.unmark(job_ids)
        except RedisError:
            log.warning("could not unmark delivered jobs (the reconciler checks SQL)")

        async def one(job_id: str) -> str:
            job = claimed.get(job_id)
            if job is None:
                return "skipped"  # not ours to run: it held no bulk slot here either
            if job.status == JobStatus.EXPIRED:
                return await announce_expired(self._ctx, job)
            try:
                # Its log lines name the job (and trace); its spans join the job's trace.
                with telemetry.job_attempt(job):
                    try:
                        outcome = await self._tracked(run_claimed(self._ctx, job))
                        log.debug("job %s attempt %d: %s", job_id, job.attempts, outcome)
                        return outcome
                    except Exception:
                        log.exception("job %s was given back to the queue", job_id)
                        return "released"
            finally:
                # Interactive jobs likewise wake the API's dispatcher (api/jobs/dispatch.py).
                wake = self._batch_wake if job.lane == "bulk" else self._job_wake
                try:
                    await wake.publish(job_id)
                except RedisError:
                    log.warning("could not wake the API's feeder (it passes on its timer)")

        return list(await asyncio.gather(*(one(job_id) for job_id in job_ids)))

    async def _heartbeat_once(self) -> None:
        info = self.engine.info
        s = self.settings
        model = ServedModel(
            name=self.settings.model_name,
            max_model_len=info.max_model_len,
            engine=info.engine,
            supports_images=info.supports_images,
            supports_structured_output=info.supports_structured_output,
            created=now_epoch(),
            reasoning_parser=s.reasoning_parser,
            tool_call_parser=s.tool_call_parser,
            root=s.model,
        )
        # Each LoRA adapter is a model of its own, on this model's engine.
        adapters = [
            dataclasses.replace(model, name=m.name, base_model=model.name, root=m.path)
            for m in s.lora_modules
        ]
        beat = WorkerBeat(
            self.worker_id,
            model.name,
            info.engine,
            len(self._in_flight),
            time.time(),
            concurrency=s.concurrency,
            bulk_window=s.bulk_window,
            bulk_window_busy=s.bulk_window_busy,
            adapters=tuple(m.name for m in adapters),
        )
        await self._registry.heartbeat(
            beat, model, ttl_seconds=3 * self.settings.heartbeat_seconds, adapters=adapters
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._heartbeat_once()
            except Exception:
                log.exception("heartbeat failed")

    async def _engine_stats_once(self) -> None:
        """The engine's load (and this worker's jobs in flight) for the API's /metrics,
        expiring as the heartbeat does."""
        load = self.engine.load() if isinstance(self.engine, ReportsLoad) else None
        stats = EngineStats(
            worker_id=self.worker_id,
            model=self.settings.model_name,
            engine=self.engine.info.engine,
            running=load.running if load else None,
            waiting=load.waiting if load else None,
            kv_cache_usage=load.kv_cache_usage if load else None,
            jobs_in_flight=dict(Counter(s.model for s in self._in_flight.values())),
        )
        await publish_engine_stats(self._redis, stats, 3 * self.settings.heartbeat_seconds)

    async def _engine_stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            try:
                await self._engine_stats_once()
            except Exception:
                log.exception("writing engine stats failed")

    async def _lease_loop(self) -> None:
        """Renew the leases of every job in flight, and abort those cancelled meanwhile."""
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            ids = list(self._in_flight)
            if not ids:
                continue
            try:
                async with self._sessions.begin() as session:
                    await jobs_repo.renew_leases(
                        session, self.worker_id, ids, self.settings.lease_seconds
                    )
                    cancelled = await jobs_repo.cancelled_among(session, ids)
                for job_id in cancelled:
                    await self._abort(job_id)
            except Exception:
                log.exception("lease renewal failed")

    async def _cancel_listener(self) -> None:
        while True:
            try:
                async with CancelChannel(self._redis).subscribe() as job_ids:
                    async for job_id in job_ids:
                        await self._abort(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cancel listener lost Redis; retrying")
                await asyncio.sleep(1)

    async def _abort(self, job_id: str) -> None:
        state = self._in_flight.get(job_id)
        if state is not None and not state.cancel_requested:
            state.cancel_requested = True
            self._admission.wake()  # if it waits to enter the engine, it stops waiting
            await self.engine.abort(state.request_id)
