"""API replicas started together on a fresh PostgreSQL database: migrations run once (an
advisory lock serialises the starters; the later ones find the schema current) and the
keys they all insert from FERRY_API_KEYS are inserted once, without an error."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from ferry_testing.procs import Proc, free_port, start, wait_until
from storage.migrate import alembic_config
from tests.conftest import KEY_A, KEY_B, PG_ADMIN, REDIS_BASE, _admin_sql

pytestmark = pytest.mark.timeout(300)
REDIS_URL = f"{REDIS_BASE}/10"  # no test stack uses db 10
REPLICAS = 3


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A database with no schema at all (its psycopg URL), dropped on exit."""
    name = f"ferry_test_replicas_{os.getpid()}_{secrets.token_hex(3)}"
    _admin_sql(f"CREATE DATABASE {name}")
    try:
        yield f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
    finally:
        _admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def test_replicas_started_together_on_an_empty_database_all_come_up(
    empty_database: str, tmp_path: Path
) -> None:
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {
        "FERRY_DATABASE_URL": empty_database.replace("postgresql://", "postgresql+asyncpg://"),
        "FERRY_REDIS_URL": REDIS_URL,
        "FERRY_API_KEYS": f"{KEY_A},{KEY_B}",
        "FERRY_OBJECT_STORE": "local",
        "FERRY_OBJECT_DIR": str(tmp_path / "objects"),
        "FERRY_MIGRATE_ON_START": "true",
    }
    ports = [free_port() for _ in range(REPLICAS)]
    # Started at once, none waiting for another: each migrates and inserts the keys.
    procs: list[Proc] = [
        start(f"replica-{i}", ["api", "--port", str(port)], env, tmp_path / "logs")
        for i, port in enumerate(ports)
    ]
    try:

        def all_up() -> bool:
            for proc in procs:
                if not proc.alive():
                    raise AssertionError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                return all(
                    httpx.get(
                        f"http://127.0.0.1:{port}/v1/models",
                        headers={"Authorization": f"Bearer {KEY_A}"},
                        timeout=5,
                    ).status_code
                    == 200
                    for port in ports
                )
            except httpx.HTTPError:
                return False

        wait_until(all_up, 120, "every replica to answer /v1/models")
        with psycopg.connect(empty_database) as conn:
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
            env_keys = conn.execute("SELECT count(*) FROM api_keys WHERE source = 'env'").fetchone()
        assert versions == [(_head_revision(),)]
        assert env_keys == (2,)
        # The two keys work on every replica (each found the same rows).
        for port in ports:
            models = httpx.get(
                f"http://127.0.0.1:{port}/v1/models",
                headers={"Authorization": f"Bearer {KEY_B}"},
                timeout=5,
            )
            assert models.status_code == 200
    finally:
        for proc in procs:
            proc.stop()
        redis.Redis.from_url(REDIS_URL).flushdb()
