"""Storage settings: where SQL and Redis live, and how long job event streams last."""

from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FERRY_", extra="ignore")

    # postgresql+asyncpg://... in production, sqlite+aiosqlite:///path/ferry.db embedded.
    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/ferry"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Each job's event stream keeps at most this many entries (approximate trim).
    event_stream_maxlen: int = 20_000
    # After a job ends its stream lives this long; later replays come from SQL.
    event_stream_ttl_seconds: int = 3600
    # Connections each process keeps open. Callers beyond it wait for one (briefly: every
    # transaction is short) rather than opening more: a connection opened and closed per
    # burst costs PostgreSQL a backend fork each time, more than the wait.
    db_pool_size: int = 20
    db_pool_overflow: int = 0


@lru_cache(maxsize=1)
def get_storage_settings() -> StorageSettings:
    return StorageSettings()
