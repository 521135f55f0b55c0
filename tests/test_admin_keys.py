"""Key administration: `/v1/admin/keys` (the admin key only; 404 for everyone else),
revocation seen by every API process within 5 s, FERRY_API_KEYS keys revoked once no longer
listed, and each key's webhook signing secret. In-process apps on a database of their own."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from redis import Redis

from api.core.settings import ApiSettings
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, new_database
from tests.fixtures.api import InProcessApi, running_api

pytestmark = pytest.mark.timeout(120)

REDIS_URL = f"{REDIS_BASE}/12"  # no test stack uses db 12
ADMIN = "sk-admin-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def keys_database() -> Iterator[str]:
    with new_database("ferry_test_keys") as url:
        Redis.from_url(REDIS_URL).flushdb()
        yield url


def settings(**changes: Any) -> ApiSettings:
    return ApiSettings(
        **{"api_keys": [KEY_A, KEY_B], "admin_key": ADMIN, "migrate_on_start": False, **changes}
    )


@pytest.fixture(scope="module")
async def api(
    keys_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcessApi]:
    objects = tmp_path_factory.mktemp("keys-objects")
    async with running_api(keys_database, REDIS_URL, objects, settings()) as running:
        yield running


@pytest.fixture
async def admin(api: InProcessApi) -> AsyncIterator[httpx.AsyncClient]:
    async with api.client(ADMIN) as client:
        yield client


def rows(database_url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://")) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def key_count(database_url: str) -> int:
    return int(rows(database_url, "SELECT count(*) FROM api_keys")[0][0])


async def create(admin: httpx.AsyncClient, name: str, **limits: int) -> dict[str, Any]:
    response = await admin.post("/v1/admin/keys", json={"name": name, "limits": limits})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_admin_creates_a_key_that_works_and_is_stored_hashed(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    created = await create(admin, "team-red", requests_per_minute=60, max_priority=3)
    token = created["key"]
    assert token.startswith("sk-ferry-")
    assert created["object"] == "api_key"
    assert created["source"] == "admin"
    assert created["name"] == "team-red"
    assert created["revoked_at"] is None
    assert abs(created["created_at"] - time.time()) < 60
    assert created["limits"]["requests_per_minute"] == 60
    assert created["limits"]["weight"] is None  # as stored: unset
    assert created["effective_limits"]["weight"] == 1  # the deployment's default
    assert "key_hash" not in created
    [(stored_hash, stored_limits)] = rows(
        api.database_url, "SELECT key_hash, limits FROM api_keys WHERE id = %s", created["id"]
    )
    assert token not in stored_hash and len(stored_hash) == 64
    assert stored_limits == {"requests_per_minute": 60, "max_priority": 3}

    async with api.client(token) as client:
        assert (await client.get("/v1/models")).status_code == 200
        conversation = await client.post("/v1/conversations", json={})
        assert conversation.status_code == 201

    shown = (await admin.get(f"/v1/admin/keys/{created['id']}")).json()
    assert "key" not in shown  # the token is shown once
    assert shown == {k: v for k, v in created.items() if k != "key"}


async def test_only_the_admin_key_reaches_the_admin_routes(
    api: InProcessApi, keys_database: str
) -> None:
    missing = (await (api.client(KEY_A)).get("/v1/admin/no-such-route")).json()
    before = key_count(keys_database)
    calls = [
        ("GET", "/v1/admin/keys", None),
        ("POST", "/v1/admin/keys", {"name": "x"}),
        ("POST", "/v1/admin/keys", {"name": ""}),  # invalid, still a 404 not a 400
        ("GET", "/v1/admin/keys/key_0000", None),
        ("PATCH", "/v1/admin/keys/key_0000", {"name": "y"}),
        ("DELETE", "/v1/admin/keys/key_0000", None),
        ("POST", "/v1/admin/keys/key_0000/webhook_secret", None),
        ("PUT", "/v1/admin/keys", None),  # not a 405 naming the methods it takes
    ]
    for key in (KEY_A, KEY_B, None, "sk-wrong", f"{ADMIN}x"):
        async with api.client(key) as client:
            for method, path, body in calls:
                response = await client.request(method, path, json=body)
                assert response.status_code == 404, (key, method, path, response.text)
                assert response.json() == missing
                assert "allow" not in response.headers
            raw = await client.post(
                "/v1/admin/keys", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert raw.status_code == 404
    assert key_count(keys_database) == before
    document = (await api.client().get("/openapi.json")).json()
    assert not [path for path in document["paths"] if path.startswith("/v1/admin")]
    assert "/v1/webhooks/secret" in document["paths"]


async def test_no_admin_key_configured_means_no_admin_api(
    keys_database: str, tmp_path: Path
) -> None:
    async with running_api(keys_database, REDIS_URL, tmp_path, settings(admin_key=None)) as plain:
        for key in (KEY_A, None, "", "None"):
            async with plain.client(key) as client:
                assert (await client.get("/v1/admin/keys")).status_code == 404


async def test_list_pages_newest_first_with_revoked_keys(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    made = [await create(admin, f"page-{i}") for i in range(5)]
    await admin.delete(f"/v1/admin/keys/{made[1]['id']}")
    seen: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = (await admin.get("/v1/admin/keys", params=params)).json()
        assert page["object"] == "list"
        assert len(page["data"]) <= 2
        seen.extend(page["data"])
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["id"]
        after = page["last_id"]
    ids = [k["id"] for k in seen]
    assert len(ids) == len(set(ids))
    # Newest first: the five made here lead, in reverse order.
    assert ids[:5] == [k["id"] for k in reversed(made)]
    assert {"env"} <= {k["source"] for k in seen}  # FERRY_API_KEYS' keys are listed too
    revoked = next(k for k in seen if k["id"] == made[1]["id"])
    assert revoked["revoked_at"] is not None
    assert all("key" not in k for k in seen)
    unknown_cursor = await admin.get("/v1/admin/keys", params={"after": "key_nope"})
    assert unknown_cursor.json()["data"] == []


async def test_patch_renames_and_replaces_given_limits(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    created = await create(admin, "patchy", requests_per_minute=10, tokens_per_minute=500)
    path = f"/v1/admin/keys/{created['id']}"
    renamed = await admin.patch(path, json={"name": "  renamed  "})
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "renamed"
    assert renamed.json()["limits"]["requests_per_minute"] == 10  # untouched

    patched = await admin.patch(
        path, json={"limits": {"requests_per_minute": 20, "tokens_per_minute": None, "weight": 3}}
    )
    assert patched.status_code == 200, patched.text
    limits = patched.json()["limits"]
    assert (limits["requests_per_minute"], limits["tokens_per_minute"], limits["weight"]) == (
        20,
        None,
        3,
    )
    assert patched.json()["name"] == "renamed"
    [(stored,)] = rows(api.database_url, "SELECT limits FROM api_keys WHERE id = %s", created["id"])
    assert stored == {"requests_per_minute": 20, "weight": 3}

    cleared = await admin.patch(
        path, json={"limits": {"requests_per_minute": None, "weight": None}}
    )
    assert cleared.json()["limits"] == {k: None for k in limits}
    [(stored,)] = rows(api.database_url, "SELECT limits FROM api_keys WHERE id = %s", created["id"])
    assert stored is None


async def test_a_changed_limit_applies_at_once_in_this_process(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    created = await create(admin, "limited", max_priority=5)
    async with api.client(created["key"]) as client:
        await client.get("/v1/models")  # the key is cached now
    await admin.patch(f"/v1/admin/keys/{created['id']}", json={"limits": {"max_priority": 2}})
    state = api.app.state.ferry
    caller = await state.keys.caller_of(f"Bearer {created['key']}")
    assert caller.limits.max_priority == 2


BAD_CREATES: list[tuple[Any, str | None]] = [
    ({"name": "x", "limits": {"requests_per_minut": 5}}, "limits.requests_per_minut"),
    ({"name": "x", "limits": {"requests_per_minute": "many"}}, "limits.requests_per_minute"),
    ({"name": "x", "limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
    ({"name": "x", "limits": {"tokens_per_minute": 10**12}}, "limits.tokens_per_minute"),
    ({"name": "x", "limits": {"max_priority": 10}}, "limits.max_priority"),
    ({"name": "x", "limits": {"weight": 0}}, "limits.weight"),
    ({"name": "x", "limits": "fast"}, "limits"),
    ({"name": "x", "limits": [1]}, "limits"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "n" * 201}, "name"),
    ({"limits": {}}, "name"),
    ({"name": "x", "extra": 1}, "extra"),
    ({"name": 5}, "name"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CREATES)
async def test_bad_creates_are_400_and_store_nothing(
    admin: httpx.AsyncClient, keys_database: str, body: Any, param: str | None
) -> None:
    before = key_count(keys_database)
    response = await admin.post("/v1/admin/keys", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert key_count(keys_database) == before


async def test_bad_patches_are_400_and_change_nothing(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    created = await create(admin, "steady", requests_per_minute=7)
    path = f"/v1/admin/keys/{created['id']}"
    for body in (
        {"limits": {"requests_per_minute": 0}},
        {"limits": {"tokens_per_minute": 10**12}},
        {"limits": {"nope": 1}},
        {"limits": {"max_concurrent_jobs": "lots"}},
        {"name": ""},
        {"name": "n" * 201},
        {"name": "ok", "limits": {"weight": -3}},  # nothing of it applied
        {"key_hash": "x"},
    ):
        response = await admin.patch(path, json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
    shown = (await admin.get(path)).json()
    assert shown["name"] == "steady"
    assert shown["limits"]["requests_per_minute"] == 7


async def test_unknown_key_ids_are_404(admin: httpx.AsyncClient) -> None:
    for method, path, body in (
        ("GET", "/v1/admin/keys/key_unknown", None),
        ("PATCH", "/v1/admin/keys/key_unknown", {"name": "z"}),
        ("DELETE", "/v1/admin/keys/key_unknown", None),
        ("POST", "/v1/admin/keys/key_unknown/webhook_secret", None),
    ):
        response = await admin.request(method, path, json=body)
        assert response.status_code == 404, (method, path)
        error = response.json()["error"]
        assert error["code"] == "not_found"
        assert "key_unknown" in error["message"]
        assert error["param"] == "key_id"


async def test_revoke_refuses_the_key_at_once_and_keeps_its_rows(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    created = await create(admin, "to-revoke")
    async with api.client(created["key"]) as client:
        conversation = (await client.post("/v1/conversations", json={})).json()
        revoked = await admin.delete(f"/v1/admin/keys/{created['id']}")
        assert revoked.status_code == 200
        assert revoked.json() == {"id": created["id"], "object": "api_key", "deleted": True}
        # This process forgot its cached keys: refused now, not in 2 s.
        refused = await client.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert rows(api.database_url, "SELECT id FROM conversations WHERE id = %s", conversation["id"])
    first = (await admin.get(f"/v1/admin/keys/{created['id']}")).json()["revoked_at"]
    assert first is not None
    again = await admin.delete(f"/v1/admin/keys/{created['id']}")
    assert again.status_code == 200
    assert (await admin.get(f"/v1/admin/keys/{created['id']}")).json()["revoked_at"] == first


async def test_a_revoked_key_is_refused_by_another_replica_within_5_seconds(
    api: InProcessApi, admin: httpx.AsyncClient, keys_database: str, tmp_path: Path
) -> None:
    created = await create(admin, "two-replicas")
    async with (
        running_api(keys_database, REDIS_URL, tmp_path, settings()) as other,
        other.client(created["key"]) as client,
    ):
        assert (await client.get("/v1/models")).status_code == 200  # cached there now
        assert (await admin.delete(f"/v1/admin/keys/{created['id']}")).status_code == 200
        revoked_at = time.monotonic()
        while (status := (await client.get("/v1/models")).status_code) == 200:
            assert time.monotonic() - revoked_at < 5, "still accepted 5 s after revocation"
            await asyncio.sleep(0.1)
        assert status == 401
        await asyncio.sleep(0.5)
        assert (await client.get("/v1/models")).status_code == 401


@pytest.fixture
def fresh_database() -> Iterator[str]:
    with new_database("ferry_test_envkeys") as url:
        yield url


async def test_unlisted_env_keys_are_revoked_at_the_next_start(
    fresh_database: str, tmp_path: Path
) -> None:
    a, b = "sk-env-a-" + secrets.token_hex(4), "sk-env-b-" + secrets.token_hex(4)
    url = fresh_database
    async with running_api(url, REDIS_URL, tmp_path, settings(api_keys=[a, b])) as first:
        for token in (a, b):
            async with first.client(token) as client:
                assert (await client.get("/v1/models")).status_code == 200
        async with first.client(ADMIN) as admin:
            made = await create(admin, "admin-made")
    async with running_api(url, REDIS_URL, tmp_path, settings(api_keys=[a])) as second:
        async with second.client(b) as client:
            assert (await client.get("/v1/models")).status_code == 401
        for token in (a, made["key"]):
            async with second.client(token) as client:
                assert (await client.get("/v1/models")).status_code == 200
        async with second.client(ADMIN) as admin:
            listed = (await admin.get("/v1/admin/keys")).json()["data"]
    by_source = {(k["source"], k["revoked_at"] is None) for k in listed}
    assert by_source == {("env", True), ("env", False), ("admin", True)}


async def test_webhook_secret_is_made_once_per_key_and_rotated_by_the_admin(
    api: InProcessApi, admin: httpx.AsyncClient
) -> None:
    created = await create(admin, "hooks")
    async with api.client(created["key"]) as client, api.client(KEY_B) as other:
        answers = await asyncio.gather(*(client.get("/v1/webhooks/secret") for _ in range(8)))
        secrets_seen = {r.json()["secret"] for r in answers}
        assert len(secrets_seen) == 1, "concurrent first calls made different secrets"
        [secret] = secrets_seen
        assert answers[0].json()["object"] == "webhook.secret"
        assert secret.startswith("whsec_")
        assert 24 <= len(base64.b64decode(secret.removeprefix("whsec_"))) <= 32
        assert (await client.get("/v1/webhooks/secret")).json()["secret"] == secret
        assert (await other.get("/v1/webhooks/secret")).json()["secret"] != secret

        rotated = await admin.post(f"/v1/admin/keys/{created['id']}/webhook_secret")
        assert rotated.status_code == 200
        new = rotated.json()["secret"]
        assert new != secret and new.startswith("whsec_")
        assert (await client.get("/v1/webhooks/secret")).json()["secret"] == new
    async with api.client(None) as anonymous:
        assert (await anonymous.get("/v1/webhooks/secret")).status_code == 401
