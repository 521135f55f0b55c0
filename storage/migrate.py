"""Apply Alembic migrations programmatically (`ferry migrate`, app start-up, tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", database_url)
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`. Several processes may call it at once: on PostgreSQL
    they queue on an advisory lock (env.py), so one migrates and the later ones find the
    schema current. SQLite has no such lock: `ferry serve` migrates once, first."""
    command.upgrade(alembic_config(database_url), revision)


async def upgrade_async(database_url: str) -> None:
    # env.py runs its own event loop, so keep it off the caller's.
    await asyncio.to_thread(upgrade, database_url)
