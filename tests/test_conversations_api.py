"""Conversations through the API in process (tests/fixtures/api.py), no engine: one key's
conversations are not found by another on every route, and listing pages newest first."""

from __future__ import annotations

import secrets
from typing import Any

import httpx
import pytest

from tests.conftest import KEY_B, TINY
from tests.fixtures.api import InProcessApi
from tests.helpers import assert_error, chat_body

pytestmark = pytest.mark.timeout(120)


async def new_conversation(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/conversations", json=body or None)
    assert response.status_code == 201, response.text
    conversation: dict[str, Any] = response.json()
    return conversation


async def test_another_keys_conversation_is_not_found_on_every_route(
    in_process_api: InProcessApi,
) -> None:
    async with in_process_api.client() as owner, in_process_api.client(KEY_B) as other:
        conversation = await new_conversation(owner)
        conversation_id = conversation["id"]
        jobs_before = (await other.get("/v1/jobs", params={"limit": 1})).json()["first_id"]
        for missing in (conversation_id, "conv_does_not_exist"):
            assert_error(await other.get(f"/v1/conversations/{missing}"), 404, "not_found")
            assert_error(await other.delete(f"/v1/conversations/{missing}"), 404, "not_found")
            body = chat_body(TINY, "Hi", max_tokens=4, conversation_id=missing)
            for path in ("/v1/jobs", "/v1/chat/completions"):
                error = assert_error(await other.post(path, json=body), 404, "not_found")
                assert missing in error["message"]
                assert error["param"] == "conversation_id"
        listed = [c["id"] for c in (await other.get("/v1/conversations?limit=100")).json()["data"]]
        jobs_after = (await other.get("/v1/jobs", params={"limit": 1})).json()["first_id"]
        still_there = await owner.get(f"/v1/conversations/{conversation_id}")
    assert conversation_id not in listed
    assert jobs_after == jobs_before  # no job was created
    assert still_there.status_code == 200 and still_there.json()["messages"] == []


async def test_list_conversations_newest_first_in_pages(in_process_api: InProcessApi) -> None:
    key = f"sk-test-c-{secrets.token_hex(4)}"  # not a configured key: 401
    async with in_process_api.client(key) as stranger:
        assert_error(await stranger.get("/v1/conversations"), 401)
    async with in_process_api.client(KEY_B) as client:
        ids = [(await new_conversation(client, title=f"t{i}"))["id"] for i in range(3)]
        page1 = (await client.get("/v1/conversations", params={"limit": 2})).json()
        page2 = (
            await client.get("/v1/conversations", params={"limit": 2, "after": page1["last_id"]})
        ).json()
        bad = await client.post("/v1/conversations", json={"title": "x" * 201})
    seen = [c["id"] for c in page1["data"] + page2["data"]]
    assert seen[:3] == list(reversed(ids))
    assert page1["has_more"] is True and page1["first_id"] == ids[-1]
    assert all(c["messages"] is None for c in page1["data"])
    assert_error(bad, 400)
