"""A write is committed before its response leaves the API.

FastAPI runs a yield dependency's exit code after the response is sent unless the
dependency is function-scoped; the request session commits in that exit code, so a client
could get `201` and then not find what it created (seen as a flaky conversation test).
This runs the real app in-process (real PostgreSQL and Redis) and, at the moment the
response body is handed to the server, looks for the row from another connection.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from redis import Redis

from api.app import create_app
from api.core.settings import ApiSettings
from storage.settings import StorageSettings
from tests.conftest import KEY_A, KEY_B, REDIS_BASE

pytestmark = pytest.mark.timeout(120)


async def test_created_conversation_is_committed_before_the_response_is_sent(
    migrated_pg: str,
) -> None:
    redis_url = f"{REDIS_BASE}/10"  # no test stack uses db 10
    Redis.from_url(redis_url).flushdb()
    storage = StorageSettings(database_url=migrated_pg, redis_url=redis_url)
    app = create_app(ApiSettings(api_keys=[KEY_A, KEY_B]), storage)
    plain_url = migrated_pg.replace("postgresql+asyncpg://", "postgresql://")
    seen: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return {
            "type": "http.request",
            "body": json.dumps({"title": "rw"}).encode(),
            "more_body": False,
        }

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            seen["status"] = message["status"]
        elif message["type"] == "http.response.body" and message.get("body"):
            conversation_id = json.loads(message["body"])["id"]
            with psycopg.connect(plain_url) as conn:
                row = conn.execute(
                    "SELECT id FROM conversations WHERE id = %s", (conversation_id,)
                ).fetchone()
            seen["committed"] = row is not None

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/conversations",
        "raw_path": b"/v1/conversations",
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "headers": [
            (b"authorization", f"Bearer {KEY_A}".encode()),
            (b"content-type", b"application/json"),
        ],
    }
    async with app.router.lifespan_context(app):
        scope["state"] = {}
        await app(scope, receive, send)
    assert seen == {"status": 201, "committed": True}
