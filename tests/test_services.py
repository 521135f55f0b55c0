"""The run's own PostgreSQL and Redis (tests/services.py), for machines that have neither."""

from __future__ import annotations

import psycopg
import redis

from tests import services
from tests.conftest import PG_ADMIN


def test_own_redis_answers_then_stops_without_a_trace() -> None:
    own = services.start_redis()
    try:
        with redis.Redis.from_url(f"{own.url}/14") as client:
            client.set("k", "v")
            assert client.get("k") == b"v"
    finally:
        own.stop()
    port = int(own.url.rsplit(":", 1)[1])
    assert own.popen.returncode is not None
    assert not services.answers("127.0.0.1", port)
    assert not own.workdir.exists()


def test_own_postgres_creates_databases_then_stops_without_a_trace() -> None:
    own = services.start_postgres()
    try:
        with psycopg.connect(own.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE ferry_own")
        with psycopg.connect(own.url.rsplit("/", 1)[0] + "/ferry_own") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    finally:
        own.stop()
    port = int(own.url.rsplit(":", 1)[1].split("/")[0])
    assert own.popen.returncode is not None
    assert not services.answers("127.0.0.1", port)
    assert not own.workdir.exists()


def test_ensure_starts_only_what_does_not_answer_and_points_env_at_it() -> None:
    dead = f"redis://127.0.0.1:{services.free_port()}"
    env = {services.PG_VAR: PG_ADMIN, services.REDIS_VAR: dead}
    run = services.ensure(env)
    try:
        assert env[services.PG_VAR] == PG_ADMIN  # answering: used as it is
        assert [s.name for s in run.started] == ["redis-server"]
        assert env[services.REDIS_VAR] == run.started[0].url != dead
        with redis.Redis.from_url(env[services.REDIS_VAR]) as client:
            assert client.ping()
        assert any("nothing answers" in note for note in run.notes)
    finally:
        started = list(run.started)
        run.stop()
    assert run.started == []
    assert all(s.popen.returncode is not None and not s.workdir.exists() for s in started)


def test_ensure_leaves_a_remote_address_alone() -> None:
    env = {services.PG_VAR: PG_ADMIN, services.REDIS_VAR: "redis://192.0.2.1:6379"}
    run = services.ensure(env)
    assert run.started == []
    assert env[services.REDIS_VAR] == "redis://192.0.2.1:6379"
