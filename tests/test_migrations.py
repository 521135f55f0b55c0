"""Upgrading a database that already holds data."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from alembic.script import ScriptDirectory

from ferry_testing.procs import start
from storage.migrate import alembic_config, upgrade
from tests.conftest import PG_ADMIN, _admin_sql

SHA_JOB = "a" * 64
SHA_TURN = "b" * 64


def test_images_sent_before_owners_were_recorded_stay_readable_by_their_senders() -> None:
    """Revision 0006 starts recording which keys sent an image (only they may read it);
    images already stored get their owners from the jobs and turns that refer to them."""
    name = f"ferry_test_upgrade_{secrets.token_hex(3)}"
    _admin_sql(f"CREATE DATABASE {name}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        upgrade(f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}", "0005")
        now = datetime.now(UTC)
        with psycopg.connect(f"{base}/{name}", autocommit=True) as conn:
            for key in ("key_a", "key_b", "key_c"):
                conn.execute(
                    "INSERT INTO api_keys (id, key_hash, created_at) VALUES (%s, %s, %s)",
                    (key, secrets.token_hex(32), now),
                )
            part = {"type": "image", "image": {"sha256": SHA_JOB, "mime": "image/png"}}
            request = {"messages": [{"role": "user", "content": [part]}]}
            conn.execute(
                "INSERT INTO jobs (id, owner_id, model, kind, lane, status, priority, request,"
                " attempts, created_at) VALUES ('job_1', 'key_a', 'm', 'chat', 'interactive',"
                " 'queued', 0, %s, 0, %s)",
                (json.dumps(request), now),
            )
            conn.execute(
                "INSERT INTO conversations (id, owner_id, created_at, updated_at)"
                " VALUES ('conv_1', 'key_b', %s, %s)",
                (now, now),
            )
            conn.execute(
                "INSERT INTO messages (conversation_id, role, content, images, created_at)"
                " VALUES ('conv_1', 'user', 'hi', %s, %s)",
                (json.dumps([{"sha256": SHA_TURN, "mime": "image/png"}]), now),
            )
        upgrade(f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}")
        with psycopg.connect(f"{base}/{name}") as conn:
            owners = set(conn.execute("SELECT sha256, owner_id FROM image_owners").fetchall())
        assert owners == {(SHA_JOB, "key_a"), (SHA_TURN, "key_b")}
    finally:
        _admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_the_migrations_build_the_schema_the_models_describe(migrated_pg: str) -> None:
    """Every column and index of storage/models.py, and nothing else, after `upgrade`."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine

    from storage.models import Base

    engine = create_engine(migrated_pg.replace("+asyncpg", "+psycopg"))
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn)
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_migrations_started_at_once_on_an_empty_database_run_once(tmp_path: Path) -> None:
    """`ferry migrate` (what each API replica runs at start) in several processes at once:
    they queue on PostgreSQL's advisory lock, the first migrates, the later ones find the
    schema at head. (Processes, not threads: Alembic's `context` is one per process.)"""
    name = f"ferry_test_upgrade_{secrets.token_hex(3)}"
    _admin_sql(f"CREATE DATABASE {name}")
    base = PG_ADMIN.rsplit("/", 1)[0]
    env = {"FERRY_DATABASE_URL": f"{base.replace('postgresql://', 'postgresql+asyncpg://')}/{name}"}
    try:
        procs = [start(f"migrate-{i}", ["migrate"], env, tmp_path) for i in range(4)]
        for proc in procs:
            assert proc.popen.wait(120) == 0, proc.log_tail()
        head = ScriptDirectory.from_config(alembic_config(env["FERRY_DATABASE_URL"]))
        with psycopg.connect(f"{base}/{name}") as conn:
            versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        assert versions == [(head.get_current_head(),)]
    finally:
        _admin_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
