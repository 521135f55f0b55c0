"""Sends the webhook messages storage recorded (storage/repositories/webhooks.py).

Every API process runs one deliverer. Each pass claims the due messages it has room for
under a lease (several replicas share the work; a message whose deliverer died is taken
over once its lease lapses), and sends each in a task of its own, so a slow receiver holds
up only its own messages. The body is rendered once, at the first attempt, as `GET` shows
the object, and stored: every retry sends the same bytes under the same `webhook-id`, with
a fresh `webhook-timestamp` and signature (Standard Webhooks receivers refuse old ones).
A non-2xx answer or no answer is retried with exponential backoff until
`webhook_max_age_seconds` after the event; a URL the SSRF guard now refuses is given up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from datetime import datetime, timedelta
from typing import Any

import httpcore
from sqlalchemy.ext.asyncio import AsyncSession
from standardwebhooks import Webhook

from api.batches import service as batches_service
from api.core.db import Database
from api.core.settings import ApiSettings
from api.images.fetch import GuardedNetworkBackend, RefusedAddress, UnresolvableHost, _ssl_context
from api.jobs.schemas import JobPublic
from api.webhooks import urls
from storage.models import WebhookDelivery, utcnow
from storage.repositories import api_keys
from storage.repositories import batches as batches_repo
from storage.repositories import jobs as jobs_repo
from storage.repositories import webhooks as webhooks_repo

log = logging.getLogger(__name__)

USER_AGENT = b"Ferry-webhooks/0.1"


def body_bytes(payload: dict[str, Any]) -> bytes:
    """The stored payload as sent: sorted keys, so the bytes do not depend on how the
    database orders a JSON object's keys (PostgreSQL's JSONB reorders them)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


async def render(session: AsyncSession, delivery: WebhookDelivery) -> dict[str, Any] | None:
    """The object as `GET /v1/jobs/{id}` or `GET /v1/batches/{id}` returns it (None: gone)."""
    if delivery.object_kind == "job":
        job = await jobs_repo.get_job(session, delivery.object_id)
        return None if job is None else JobPublic.from_row(job).model_dump(mode="json")
    batch = await batches_repo.get_batch(session, delivery.object_id)
    if batch is None:
        return None
    return (await batches_service.public(session, [batch]))[0].model_dump(mode="json")


class WebhookDeliverer:
    def __init__(self, db: Database, settings: ApiSettings) -> None:
        self._db = db
        self._settings = settings
        self._allowed = urls.allowed_networks(settings)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        # A message is held for a whole attempt, with room to record its outcome.
        self._lease_seconds = settings.webhook_timeout_seconds + 30.0

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="webhook-deliverer")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        """Attempts in flight are abandoned: their leases lapse and they are sent again
        (at least once), by this process's successor or another replica."""
        tasks = [t for t in (self._loop_task, *self._in_flight) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            # Cleared first: a wake-up during the pass (a slot freed) starts the next one.
            self._wake.clear()
            try:
                await self._pass()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook deliverer pass failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._settings.webhook_poll_seconds)

    async def _pass(self) -> None:
        room = self._settings.webhook_concurrency - len(self._in_flight)
        if room <= 0:
            return
        async with self._db.transaction() as session:
            claimed = await webhooks_repo.claim_due(
                session, limit=room, lease_seconds=self._lease_seconds
            )
        for delivery in claimed:
            task = asyncio.create_task(self._attempt(delivery.id), name=f"webhook {delivery.id}")
            self._in_flight.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # room for another message

    async def _attempt(self, message_id: str) -> None:
        try:
            await self._deliver(message_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Left to its lease: it is tried again once that lapses.
            log.exception("webhook %s: attempt failed unexpectedly", message_id)

    async def _deliver(self, message_id: str) -> None:
        async with self._db.transaction() as session:
            delivery = await webhooks_repo.get(session, message_id)
            if delivery is None:
                return
            kind, url, event = delivery.object_kind, delivery.url, delivery.event
            attempts, created_at = delivery.attempts, delivery.created_at
            payload = delivery.payload
            if payload is None:
                rendered = await render(session, delivery)
                if rendered is not None:
                    # Conditional: a deliverer that took the message over may have fixed
                    # the body first; theirs is the one every attempt sends.
                    await webhooks_repo.set_payload(session, message_id, rendered)
                    stored = await webhooks_repo.get(session, message_id)
                    payload = stored.payload if stored is not None else None
            secret = await api_keys.webhook_secret(session, delivery.owner_id)
        if payload is None:
            await self._record(message_id, None, f"{kind} not found", give_up=True)
            return
        body = body_bytes(payload)
        status, error, give_up = await self.send(message_id, url, body, secret, event)
        if status is not None and 200 <= status < 300:
            await self._record(message_id, status, None, delivered=True)
            return
        log.info("webhook %s to %s: %s", message_id, url, error or f"HTTP {status}")
        await self._record(
            message_id,
            status,
            error,
            give_up=give_up,
            retry_at=None if give_up else self._retry_at(attempts, created_at),
        )

    def _retry_at(self, attempts: int, created_at: datetime) -> datetime | None:
        """After the (attempts+1)-th failure: base x 2^attempts seconds (capped), +-25 %
        jitter so that a receiver back up is not hit by every backlog at once; never past
        the message's last day. None: the day is over."""
        now = utcnow()
        deadline = created_at + timedelta(seconds=self._settings.webhook_max_age_seconds)
        if now >= deadline:
            return None
        s = self._settings
        delay = s.webhook_retry_base_seconds * 2 ** min(attempts, 30)
        delay = min(delay, s.webhook_retry_max_seconds)
        delay *= random.uniform(0.75, 1.25)
        return min(now + timedelta(seconds=delay), deadline)

    async def _record(
        self,
        message_id: str,
        status: int | None,
        error: str | None,
        *,
        delivered: bool = False,
        give_up: bool = False,
        retry_at: datetime | None = None,
    ) -> None:
        async with self._db.transaction() as session:
            await webhooks_repo.record_attempt(
                session,
                message_id,
                status=status,
                error=error[:2000] if error else None,
                delivered=delivered,
                next_attempt_at=None if give_up else retry_at,
            )

    async def send(
        self, message_id: str, url: str, body: bytes, secret: str, event: str
    ) -> tuple[int | None, str | None, bool]:
        """One signed POST: (HTTP status or None, error, whether to give up for good)."""
        try:
            target = await urls.vet(url, self._allowed)
        except urls.RefusedUrl as exc:
            return None, str(exc), True
        except UnresolvableHost:
            return None, "the host could not be resolved", False
        timestamp = utcnow()
        headers = [
            (b"Host", target.netloc),
            (b"User-Agent", USER_AGENT),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"webhook-id", message_id.encode()),
            (b"webhook-timestamp", str(int(timestamp.timestamp())).encode()),
            (b"webhook-signature", Webhook(secret).sign(message_id, timestamp, body).encode()),
            # Which event (the body is the object at the first attempt, maybe past it).
            (b"ferry-webhook-event", event.encode()),
        ]
        timeout = self._settings.webhook_timeout_seconds
        request_url = httpcore.URL(
            scheme=target.raw_scheme, host=target.raw_host, port=target.port, target=target.raw_path
        )
        extensions = {
            "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
        }
        # A pool per attempt: each delivery resolves and checks the host anew (DNS may have
        # changed), and connects to the very address it checked. Redirects are not followed.
        pool = httpcore.AsyncConnectionPool(
            ssl_context=_ssl_context(),
            network_backend=GuardedNetworkBackend(self._allowed),
            max_connections=1,
            retries=0,
        )
        try:
            post = pool.stream(
                "POST", request_url, headers=headers, content=body, extensions=extensions
            )
            async with pool, asyncio.timeout(timeout), post as response:
                return response.status, None, False
        except RefusedAddress as exc:
            return None, str(exc), True
        except UnresolvableHost:
            return None, "the host could not be resolved", False
        except (TimeoutError, httpcore.TimeoutException):
            return None, f"no answer within {timeout:g} s", False
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as e:
            return None, f"{type(e).__name__}: {e}", False
