"""The clients the API process owns, created once in the lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from redis.asyncio import Redis

from api.core.auth import KeyRing
from api.core.db import Database
from api.core.settings import ApiSettings
from api.jobs.enqueue import JobQueue
from api.jobs.intake import JobIntake
from api.models.catalog import ModelCatalog
from api.streaming.event_hub import JobEventHub
from api.streaming.job_events import EventSources
from storage.channels import CancelChannel
from storage.events import JobEventStream
from storage.objects import ObjectStore
from storage.ratelimit import RateLimiter
from storage.registry import ModelRegistry
from storage.settings import StorageSettings


@dataclass
class AppState:
    settings: ApiSettings
    storage: StorageSettings
    db: Database
    redis: Redis
    events: JobEventStream
    hub: JobEventHub
    registry: ModelRegistry
    queue: JobQueue
    intake: JobIntake
    keys: KeyRing
    catalog: ModelCatalog
    # Images and files (S3 or a local directory); blocking calls: use asyncio.to_thread.
    objects: ObjectStore
    # Running jobs' aborts, heard by every worker.
    cancels: CancelChannel

    @cached_property
    def limiter(self) -> RateLimiter:
        """Per-key rate limits (api/core/ratelimit.py), on this process's Redis client."""
        return RateLimiter(self.redis)

    @property
    def event_sources(self) -> EventSources:
        return EventSources(self.hub, self.events, self.db)
