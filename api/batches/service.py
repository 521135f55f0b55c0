"""Creating, cancelling and showing batches: what the routes call."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from api.batches.schemas import ENDPOINTS, BatchCreate, BatchPublic
from api.core.errors import Conflict, InvalidRequest, NotFound
from api.core.settings import ApiSettings
from api.webhooks import urls as webhook_urls
from storage.channels import CancelChannel
from storage.job_metrics import record_jobs_ended
from storage.models import Batch, BatchStatus, JobStatus, utcnow
from storage.repositories import batch_jobs as batch_jobs_repo
from storage.repositories import batches as batches_repo
from storage.repositories import files as files_repo

if TYPE_CHECKING:
    from api.batches.supervisor import BatchSupervisor

log = logging.getLogger(__name__)

_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str, longest: int) -> int:
    match = _WINDOW.match(window)
    if match is None:
        raise InvalidRequest(
            f"completion_window `{window}` is not a duration such as `24h` (or `30m`, `2d`).",
            param="completion_window",
            code="invalid_completion_window",
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > longest:
        raise InvalidRequest(
            f"completion_window `{window}` is longer than this server's limit of "
            f"{longest} seconds.",
            param="completion_window",
            code="invalid_completion_window",
        )
    return seconds


async def input_lines(session: AsyncSession, batch: Batch) -> int:
    """The non-blank lines of a batch's input file (create_batch has just read it)."""
    file = await files_repo.get_owned_file(session, batch.input_file_id, batch.owner_id)
    return file.line_count if file is not None else 0


async def create_batch(
    settings: ApiSettings, session: AsyncSession, owner_id: str, body: BatchCreate
) -> Batch:
    """Check the request against the file, store the batch (`validating`); the caller
    commits, then starts its expansion."""
    if body.endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"endpoint `{body.endpoint}` is not supported; use one of {', '.join(ENDPOINTS)}.",
            param="endpoint",
            code="unsupported_endpoint",
        )
    seconds = window_seconds(body.completion_window, settings.batch_max_completion_window_seconds)
    file = await files_repo.get_owned_file(session, body.input_file_id, owner_id)
    if file is None:
        raise NotFound(f"No file with id `{body.input_file_id}`.", param="input_file_id")
    if file.purpose != "batch":
        raise InvalidRequest(
            f"File `{file.id}` has purpose `{file.purpose}`; a batch's input file must be "
            "uploaded with purpose `batch`.",
            param="input_file_id",
            code="invalid_file_purpose",
        )
    if file.urls and body.endpoint not in file.urls:
        raise InvalidRequest(
            f"endpoint `{body.endpoint}` does not match the file: its lines call "
            f"{', '.join(f'`{u}`' for u in file.urls)}.",
            param="endpoint",
            code="endpoint_mismatch",
        )
    webhook, webhook_events = await webhook_urls.check_subscription(
        body.webhook, body.webhook_events_filter, settings
    )
    now = utcnow()
    batch = Batch(
        id=batches_repo.new_batch_id(),
        owner_id=owner_id,
        endpoint=body.endpoint,
        input_file_id=file.id,
        completion_window=body.completion_window,
        status=BatchStatus.VALIDATING,
        metadata_=body.metadata,
        webhook_url=webhook,
        webhook_events=webhook_events,
        request_total=0,
        invalid_count=0,
        created_at=now,
        expires_at=now + timedelta(seconds=seconds),
        # This process expands it right after the commit; others wait out the lease.
        lease_expires_at=now + timedelta(seconds=settings.batch_expand_lease_seconds),
    )
    await batches_repo.add_batch(session, batch)
    return batch


async def cancel_batch(
    cancels: CancelChannel,
    session: AsyncSession,
    batch: Batch,
    supervisor: BatchSupervisor,
    redis: Redis | None = None,
) -> Batch:
    """Queued lines never run; running ones are aborted in their engines; lines that
    finished keep their results. The batch is `cancelling` until its running lines have
    stopped, then `cancelled` with its files."""
    status = batch.status
    if status == BatchStatus.CANCELLING:
        return batch
    if not await batches_repo.request_cancel(session, batch.id):
        current = await batches_repo.get_batch(session, batch.id)
        state_now = current.status if current else status
        raise Conflict(
            f"Batch `{batch.id}` cannot be cancelled: it is {state_now}.",
            param="batch_id",
            code="batch_not_cancellable",
        )
    cancelled = await batch_jobs_repo.cancel_open_jobs(session, batch.id)
    await session.commit()
    await count_cancelled(redis, batch.id, cancelled)
    for job_id in cancelled.running:
        await cancels.publish(job_id)
    supervisor.wake(full=True)
    refreshed = await batches_repo.get_batch(session, batch.id)
    assert refreshed is not None
    return refreshed


async def count_cancelled(
    redis: Redis | None, batch_id: str, cancelled: batch_jobs_repo.CancelledLines
) -> None:
    """Count the lines a cancel (or an expiry) ended, after its commit (best effort)."""
    if redis is None:
        return
    try:
        await record_jobs_ended(redis, JobStatus.CANCELLED.value, cancelled.by_model)
    except Exception:
        log.warning("batch %s: could not count its cancelled lines", batch_id, exc_info=True)


async def public(session: AsyncSession, batches: list[Batch]) -> list[BatchPublic]:
    """The batches as the API shows them, request counts and usage counted in SQL."""
    progress = await batch_jobs_repo.progress(session, [b.id for b in batches])
    return [BatchPublic.from_row(b, progress.get(b.id)) for b in batches]
