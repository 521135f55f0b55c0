"""The retention sweep: deletes what is past its age, a bounded batch at a time.

Finished jobs (with their deltas; batch lines go with their batch), idle conversations
(with their messages), files (row, then bytes), ended batches (lines and line errors
first), images no remaining job or stored turn refers to, expired `Idempotency-Key`
records, and delivered or given-up webhook messages. Ages come from `FERRY_RETAIN_*`
(0: kept for good).

Each statement deletes at most `FERRY_RETENTION_BATCH_SIZE` rows through an index, in its
own short transaction, with a pause between: no table is locked for long and the sweep
runs beside live traffic. Object-store bytes are deleted only once their rows are gone.
One API process at a time sweeps (a Redis turn, renewed while it runs). Counters are never
touched: what /metrics counts is kept apart from these rows.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from redis.asyncio import Redis
from redis.exceptions import LockError

from api.core.db import Database
from api.core.settings import ApiSettings
from storage.locks import retention_lock
from storage.models import utcnow
from storage.objects import ObjectStore, file_key, image_key
from storage.repositories import idempotency as idempotency_repo
from storage.repositories import retention as retention_repo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Ages in seconds (0: keep for good) and how the sweep paces itself."""

    jobs: float
    conversations: float
    files: float
    batches: float
    images: float
    webhook_deliveries: float
    batch_size: int
    pause_seconds: float

    @classmethod
    def from_settings(cls, settings: ApiSettings) -> RetentionPolicy:
        return cls(
            jobs=settings.retain_jobs_seconds,
            conversations=settings.retain_conversations_seconds,
            files=settings.retain_files_seconds,
            batches=settings.retain_batches_seconds,
            images=settings.retain_images_seconds,
            webhook_deliveries=settings.retain_webhook_deliveries_seconds,
            batch_size=settings.retention_batch_size,
            pause_seconds=settings.retention_pause_seconds,
        )


@dataclass
class SweepReport:
    """What one sweep deleted (rows, or objects for `*_objects`), how many delete
    statements (bounded batches) it took per kind, and the candidates it kept (images
    still referred to)."""

    deleted: Counter[str] = field(default_factory=Counter)
    statements: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)


class RetentionSweeper:
    def __init__(
        self,
        db: Database,
        redis: Redis,
        objects: ObjectStore,
        policy: RetentionPolicy,
        *,
        interval_seconds: float,
    ) -> None:
        self._db = db
        self._objects = objects
        self._policy = policy
        self._redis = redis
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None
        self._renew: Callable[[], Awaitable[object]] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            lock = retention_lock(self._redis, self._interval)
            try:
                if not await lock.acquire():
                    continue
                self._renew = lock.reacquire
                report = await self.sweep_once()
                if report.deleted:
                    log.info("retention sweep deleted %s", dict(report.deleted))
            except LockError:
                log.warning("retention sweep stopped: its turn lapsed to another process")
            except Exception:
                log.exception("retention sweep failed")
            finally:
                self._renew = None

    async def sweep_once(self, now: datetime | None = None) -> SweepReport:
        """One full sweep; each kind runs until nothing of it is past its age."""
        now = now or utcnow()
        report = SweepReport()
        policy = self._policy

        def cutoff(age: float) -> datetime | None:
            return now - timedelta(seconds=age) if age > 0 else None

        if (before := cutoff(policy.batches)) is not None:
            await self._sweep_batches(before, report)
        if (before := cutoff(policy.jobs)) is not None:
            await self._repeat(report, "jobs", retention_repo.delete_finished_jobs, before)
        if (before := cutoff(policy.conversations)) is not None:
            await self._sweep_conversations(before, report)
        if (before := cutoff(policy.files)) is not None:
            await self._sweep_files(before, report)
        if (before := cutoff(policy.webhook_deliveries)) is not None:
            await self._repeat(
                report, "webhook_deliveries", retention_repo.delete_done_webhooks, before
            )
        await self._repeat(report, "idempotency_keys", idempotency_repo.delete_expired, now)
        # Last: jobs and turns deleted above no longer keep their images.
        if (before := cutoff(policy.images)) is not None:
            await self._sweep_images(before, now, report)
        return report

    async def _pause(self) -> None:
        if self._renew is not None:
            await self._renew()
        await asyncio.sleep(self._policy.pause_seconds)

    async def _repeat(
        self,
        report: SweepReport,
        kind: str,
        delete_batch: Callable[..., Awaitable[int | list[str]]],
        before: datetime,
    ) -> None:
        """Call `delete_batch` (one bounded statement, its own transaction) until it
        deletes less than a full batch."""
        size = self._policy.batch_size
        while True:
            async with self._db.transaction() as session:
                deleted = await delete_batch(session, before, size)
            count = deleted if isinstance(deleted, int) else len(deleted)
            report.statements[kind] += 1
            report.deleted[kind] += count
            if count < size:
                return
            await self._pause()

    async def _sweep_conversations(self, before: datetime, report: SweepReport) -> None:
        size = self._policy.batch_size
        while True:
            async with self._db.transaction() as session:
                swept = await retention_repo.delete_idle_conversations(session, before, size)
            report.deleted["conversations"] += swept.conversations
            report.statements["conversations"] += swept.statements
            if swept.conversations == 0:
                return
            await self._pause()

    async def _sweep_files(self, before: datetime, report: SweepReport) -> None:
        size = self._policy.batch_size
        while True:
            async with self._db.transaction() as session:
                ids = await retention_repo.delete_old_files(session, before, size)
            report.statements["files"] += 1
            report.deleted["files"] += len(ids)
            # The rows are committed: no request finds these files any more.
            for file_id in ids:
                await asyncio.to_thread(self._objects.delete, file_key(file_id))
            report.deleted["file_objects"] += len(ids)
            if len(ids) < size:
                return
            await self._pause()

    async def _sweep_batches(self, before: datetime, report: SweepReport) -> None:
        size = self._policy.batch_size
        while True:
            async with self._db.read() as session:
                batch_ids = await retention_repo.ended_batches(session, before, size)
            for batch_id in batch_ids:
                await self._sweep_batch(batch_id, report)
            if len(batch_ids) < size:
                return

    async def _sweep_batch(self, batch_id: str, report: SweepReport) -> None:
        size = self._policy.batch_size
        for kind, delete_some in (
            ("batch_lines", retention_repo.delete_batch_lines),
            ("batch_line_errors", retention_repo.delete_batch_line_errors),
        ):
            while True:
                async with self._db.transaction() as session:
                    count = await delete_some(session, batch_id, size)
                report.statements[kind] += 1
                report.deleted[kind] += count
                if count < size:
                    break
                await self._pause()
        async with self._db.transaction() as session:
            report.deleted["batches"] += await retention_repo.delete_batch(session, batch_id)
        report.statements["batches"] += 1
        await self._pause()

    async def _sweep_images(self, before: datetime, now: datetime, report: SweepReport) -> None:
        size = self._policy.batch_size
        while True:
            async with self._db.read() as session:
                candidates = await retention_repo.unused_image_candidates(session, before, size)
            report.statements["images"] += 1
            for sha256 in candidates:
                await self._sweep_image(sha256, before, now, report)
            if len(candidates) < size:
                return
            await self._pause()

    async def _sweep_image(
        self, sha256: str, before: datetime, now: datetime, report: SweepReport
    ) -> None:
        """Under the image's lock (intake holds it shared from recording a use until the
        bytes are stored): check its references, delete its rows, then its bytes, then
        commit. Should the commit fail, the rows of an image nothing refers to stay, and
        the next sweep deletes them."""
        async with self._db.transaction() as session:
            if not await retention_repo.lock_image(session, sha256):
                return
            if await retention_repo.image_referenced(session, sha256):
                await retention_repo.mark_image_used(session, sha256, now)
                report.kept["images"] += 1
                return
            if not await retention_repo.delete_image_owners(session, sha256, before):
                return
            await asyncio.to_thread(self._objects.delete, image_key(sha256))
        report.deleted["images"] += 1
