"""Sends jobs' Celery messages, after their rows are committed.

Celery's producer is blocking, so sending happens on one thread of its own, fed through a
thread-safe queue: `enqueue` hands jobs over without waiting, and whatever jobs arrive
while one batch is being sent go out together on one producer connection. The thread
needs nothing from the API's event loop (it marks jobs pending with its own Redis
client), so a burst of requests keeping the loop busy does not hold back the messages of
jobs already committed (sent from the loop, a burst's last messages trailed its first ones:
bench/README.md). A job whose send fails stays `queued` in SQL and the reconciler sends it
again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from celery import Celery
from redis import Redis

from storage.broker import celery_conf, celery_priority
from storage.keys import RUN_JOBS_TASK, Lane, queue_name
from storage.pending import SyncPendingJobs

log = logging.getLogger(__name__)
# Every message is storage.keys.RUN_JOBS_TASK: a list of job ids (it says why several).
# Batch lines go this many to a message.
BULK_LINES_PER_MESSAGE = 8
# Interactive jobs sent together share messages, but a burst is always spread over at
# least this many messages, so that as many workers can share it; a job that arrives
# alone is a message of its own.
INTERACTIVE_MIN_MESSAGES = 8
INTERACTIVE_JOBS_PER_MESSAGE = 8


@dataclass(frozen=True, slots=True)
class QueuedJob:
    id: str
    model: str
    lane: Lane
    priority: int


def create_producer(redis_url: str) -> Celery:
    app = Celery("ferry-api", broker=redis_url)
    app.conf.update(celery_conf())
    return app


@dataclass(frozen=True, slots=True)
class _Send:
    jobs: list[QueuedJob]
    # Set once the batch holding these jobs has gone out (send_now waits on it).
    done: concurrent.futures.Future[None] | None


class JobQueue:
    def __init__(self, celery: Celery, redis_url: str) -> None:
        self._celery = celery
        self._redis = Redis.from_url(redis_url, socket_timeout=30, socket_connect_timeout=10)
        self._pending = SyncPendingJobs(self._redis)
        self._inbox: queue.SimpleQueue[_Send | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="job-queue", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        """Send what was handed over, then end the thread."""
        self._inbox.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 60)
        self._redis.close()

    def enqueue(self, jobs: Sequence[QueuedJob]) -> None:
        """Hand committed jobs over for sending; returns at once (any thread)."""
        if jobs:
            self._inbox.put(_Send(list(jobs), None))

    async def send_now(self, jobs: Sequence[QueuedJob]) -> None:
        """Send and wait; raises what sending raised (the reconciler's and batch feeder's
        path)."""
        if not jobs:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._inbox.put(_Send(list(jobs), done))
        await asyncio.wrap_future(done)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = [self._inbox.get()]
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            stopping = None in items
            sends = [item for item in items if item is not None]
            error: Exception | None = None
            try:
                self._send([job for send in sends for job in send.jobs])
            except Exception as exc:
                # The rows are in SQL: the reconciler re-sends what did not go out.
                log.exception(
                    "sending %d jobs failed; the reconciler will retry",
                    sum(len(send.jobs) for send in sends),
                )
                error = exc
            for send in sends:
                if send.done is None:
                    continue
                if error is None:
                    send.done.set_result(None)
                else:
                    send.done.set_exception(error)

    def _send(self, jobs: Sequence[QueuedJob]) -> None:
        if not jobs:
            return
        now = time.time()
        # Mark first: a worker that claims the job removes the mark, so the mark must not
        # land after the claim.
        self._pending.mark([job.id for job in jobs], now)
        with self._celery.producer_or_acquire() as producer:
            for job_ids, first in _messages(jobs):
                self._celery.send_task(
                    RUN_JOBS_TASK,
                    args=[job_ids],
                    queue=queue_name(first.model, first.lane),
                    priority=celery_priority(first.priority),
                    producer=producer,
                )


def _messages(jobs: Sequence[QueuedJob]) -> list[tuple[list[str], QueuedJob]]:
    """(job ids, a job giving queue and priority) per message. Jobs of one message share
    model, lane and priority. Batch lines go up to BULK_LINES_PER_MESSAGE a message.
    Interactive jobs of one model and priority go one per message up to
    INTERACTIVE_MIN_MESSAGES of them; more are spread evenly over that many messages (or
    more, so that none carries over INTERACTIVE_JOBS_PER_MESSAGE)."""
    messages: list[tuple[list[str], QueuedJob]] = []
    groups: dict[tuple[str, str, int], list[QueuedJob]] = {}
    for job in jobs:
        groups.setdefault((job.lane, job.model, job.priority), []).append(job)
    for (lane, _, _), group in groups.items():
        if lane == Lane.BULK:
            for i in range(0, len(group), BULK_LINES_PER_MESSAGE):
                chunk = group[i : i + BULK_LINES_PER_MESSAGE]
                messages.append(([j.id for j in chunk], chunk[0]))
            continue
        count = max(
            min(len(group), INTERACTIVE_MIN_MESSAGES),
            -(-len(group) // INTERACTIVE_JOBS_PER_MESSAGE),
        )
        messages.extend(([j.id for j in chunk], chunk[0]) for chunk in _split_evenly(group, count))
    return messages


def _split_evenly(items: list[QueuedJob], count: int) -> list[list[QueuedJob]]:
    """`count` consecutive runs of `items` whose lengths differ by at most one."""
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for k in range(count):
        end = start + size + (1 if k < extra else 0)
        runs.append(items[start:end])
        start = end
    return runs
