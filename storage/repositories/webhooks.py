"""Every query on webhook deliveries (storage.models.WebhookDelivery).

A delivery is inserted by the repository function that makes the state change it announces
(a job's claim or end, a batch's end), in that same transaction: the message exists if and
only if the change committed. The API's deliverer (api/webhooks/deliverer.py) then claims
due messages under a lease, sends them, and records each attempt here.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import WEBHOOK_DUE, WebhookDelivery, utcnow

# What a job's and a batch's webhook may announce (`webhook_events_filter`), as Replicate
# and OpenAI name the states.
JOB_EVENTS = ("start", "completed")
BATCH_EVENTS = ("completed", "failed", "expired", "cancelled")


def new_message_id() -> str:
    """`webhook-id`: chosen once, sent unchanged on every attempt (receivers dedupe on it)."""
    return f"msg_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class Announcement:
    """One webhook to record: the subscriber's URL and the event that happened."""

    owner_id: str
    url: str
    object_kind: str
    object_id: str
    event: str


def wanted(url: str | None, events: Sequence[str] | None, event: str) -> bool:
    """Does the object's subscription (its `webhook` and `webhook_events_filter`) take it?"""
    return url is not None and (events is None or event in events)


async def record(session: AsyncSession, announcements: Sequence[Announcement]) -> None:
    """Insert the messages in the caller's transaction (one multi-row INSERT)."""
    if not announcements:
        return
    now = utcnow()
    await session.execute(
        insert(WebhookDelivery),
        [
            {
                "id": new_message_id(),
                "owner_id": a.owner_id,
                "url": a.url,
                "object_kind": a.object_kind,
                "object_id": a.object_id,
                "event": a.event,
                "attempts": 0,
                "next_attempt_at": now,
                "created_at": now,
            }
            for a in announcements
        ],
    )


async def claim_due(
    session: AsyncSession, *, limit: int, lease_seconds: float
) -> list[WebhookDelivery]:
    """Take up to `limit` messages due now that nobody holds, for `lease_seconds`.

    One statement: on PostgreSQL the inner SELECT skips rows another replica is claiming
    (FOR UPDATE SKIP LOCKED), so replicas share the work without waiting on each other;
    SQLite has one writer at a time and ignores the clause. A deliverer that dies leaves
    its lease to lapse, and another takes the message over.
    """
    if limit <= 0:
        return []
    now = utcnow()
    due = select(WebhookDelivery.id).where(
        text(WEBHOOK_DUE),
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.locked_until.is_(None), WebhookDelivery.locked_until < now),
    )
    # A read first: most passes find nothing, and an UPDATE, even of no row, would take
    # SQLite's write lock every pass.
    if await session.scalar(due.limit(1)) is None:
        return []
    due = due.order_by(WebhookDelivery.next_attempt_at).limit(limit)
    due = due.with_for_update(skip_locked=True)
    rows = await session.scalars(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(due.scalar_subquery()))
        .values(locked_until=now + timedelta(seconds=lease_seconds))
        .returning(WebhookDelivery),
        execution_options={"populate_existing": True, "synchronize_session": False},
    )
    return list(rows)


async def get(session: AsyncSession, message_id: str) -> WebhookDelivery | None:
    return await session.get(WebhookDelivery, message_id, populate_existing=True)


async def list_for_object(session: AsyncSession, object_id: str) -> list[WebhookDelivery]:
    query = (
        select(WebhookDelivery)
        .where(WebhookDelivery.object_id == object_id)
        .order_by(WebhookDelivery.created_at, WebhookDelivery.id)
    )
    return list((await session.scalars(query)).all())


async def set_payload(session: AsyncSession, message_id: str, payload: dict[str, object]) -> None:
    """The body, fixed at the first attempt; never replaced (every retry sends these bytes)."""
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == message_id, WebhookDelivery.payload.is_(None))
        .values(payload=payload)
        .execution_options(synchronize_session=False)
    )


async def record_attempt(
    session: AsyncSession,
    message_id: str,
    *,
    status: int | None,
    error: str | None,
    delivered: bool,
    next_attempt_at: datetime | None,
) -> None:
    """One attempt's outcome: delivered, retried at `next_attempt_at`, or (neither) failed
    for good. Releases the lease."""
    now = utcnow()
    values: dict[str, object] = {
        "attempts": WebhookDelivery.attempts + 1,
        "last_status": status,
        "last_error": error,
        "locked_until": None,
    }
    if delivered:
        values["delivered_at"] = now
    elif next_attempt_at is not None:
        values["next_attempt_at"] = next_attempt_at
    else:
        values["failed_at"] = now
    await session.execute(
        update(WebhookDelivery)
        .where(and_(WebhookDelivery.id == message_id, text(WEBHOOK_DUE)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
