"""One Redis pub/sub connection per API process, fanned out to every SSE subscriber.

Subscribing to a job's channel waits for Redis to confirm the subscription, so a caller
that reads the job's stream backlog afterwards cannot miss an event published in between.
The reader takes messages with redis-py's public `PubSub.get_message`, which also
reconnects and resubscribes every channel after a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from storage.events import JobEvent
from storage.keys import job_channel

log = logging.getLogger(__name__)

# Always subscribed, so the reader has a subscription to wait on even when idle.
_IDLE_CHANNEL = "ferry:hub:idle"


class JobEventHub:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub: PubSub | None = None
        self._subscribers: dict[str, set[asyncio.Queue[JobEvent | None]]] = defaultdict(set)
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pubsub = self._redis.pubsub()
        await self._pubsub.subscribe(_IDLE_CHANNEL)
        self._reader = asyncio.create_task(self._read(), name="event-hub-reader")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()

    @contextlib.asynccontextmanager
    async def subscribe(self, job_id: str) -> AsyncIterator[asyncio.Queue[JobEvent | None]]:
        """A queue receiving the job's live events while the context is open. The hub
        puts only events in it; the subscriber may put None itself (api/streaming/job_events.py's
        keep-alive timer)."""
        channel = job_channel(job_id)
        queue: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        async with self._lock:
            first = not self._subscribers[channel]
            self._subscribers[channel].add(queue)
            if first:
                confirmed = asyncio.get_running_loop().create_future()
                self._confirmations[channel] = confirmed
                assert self._pubsub is not None
                await self._pubsub.subscribe(channel)
            else:
                confirmed = self._confirmations.get(channel) or _done_future()
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), timeout=10)
            yield queue
        finally:
            async with self._lock:
                subscribers = self._subscribers.get(channel)
                if subscribers is not None:
                    subscribers.discard(queue)
                    if not subscribers:
                        del self._subscribers[channel]
                        self._confirmations.pop(channel, None)
                        assert self._pubsub is not None
                        await self._pubsub.unsubscribe(channel)

    async def _read(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        while True:
            try:
                # timeout=None: wait for the next message. After a lost connection the
                # next call reconnects and resubscribes (PubSub.on_connect); what was
                # published meanwhile comes from the streams (a gap in the ids).
                message = await pubsub.get_message(timeout=None)
                if message is not None:
                    self._handle(message)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("event hub lost its Redis connection; reconnecting")
                await asyncio.sleep(0.5)

    def _handle(self, message: dict[str, Any]) -> None:
        """A message as redis-py gives it: a job event, or a subscription's confirmation."""
        kind = message["type"]
        if kind == "message":
            self._deliver(message["channel"], message["data"])
        elif kind == "subscribe":
            confirmed = self._confirmations.get(_text(message["channel"]))
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)

    def _deliver(self, raw_channel: bytes | str, data: bytes | str) -> None:
        subscribers = self._subscribers.get(_text(raw_channel))
        if not subscribers:
            return
        event = JobEvent.from_json(data)
        for queue in subscribers:
            queue.put_nowait(event)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _done_future() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
