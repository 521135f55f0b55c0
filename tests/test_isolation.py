"""Isolation between API keys, route by route: key B cannot read, list, stream, cancel,
download or delete key A's jobs, conversations, files, batches or images, nor use them in
requests of its own; to B they are as absent as ids that never existed (404), and A's
objects are untouched afterwards.

The table below must name every route that takes an object's id: a new such route fails
`test_every_route_with_an_id_is_covered` until it is added here.

API-level: the app runs in process (tests/fixtures/api.py), no worker: jobs stay queued."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.routing import APIRoute
from redis import Redis

from storage.keys import MODELS_HASH
from storage.registry import ServedModel, now_epoch
from tests.batching import CHAT, chat_line, jsonl
from tests.conftest import KEY_B, TINY
from tests.fixtures.api import InProcessApi
from tests.helpers import assert_error
from tests.imaging import data_url, image_bytes

pytestmark = pytest.mark.timeout(120)

VISION = "ferry-isolation-vision"
IMAGE = image_bytes("PNG", (20, 14), (10, 160, 90))


@dataclass(frozen=True)
class Owned:
    """Key A's objects, one of each kind."""

    job: str
    conversation: str
    file: str
    batch: str
    image: str

    def fill(self, path: str) -> str:
        return path.format(
            job_id=self.job,
            conversation_id=self.conversation,
            file_id=self.file,
            batch_id=self.batch,
            sha256=self.image,
        )


@pytest.fixture(scope="module")
async def owned(in_process_api: InProcessApi) -> AsyncIterator[Owned]:
    # An image-taking model, announced only while A sends its image.
    vision = ServedModel(VISION, 2048, "vllm", supports_images=True, created=now_epoch())
    with Redis.from_url(in_process_api.redis_url) as redis:
        redis.hset(MODELS_HASH, VISION, vision.to_json())
    try:
        async with in_process_api.client() as a:
            conversation = (await a.post("/v1/conversations", json={"title": "A's"})).json()
            await asyncio.sleep(2.1)  # the catalog's cache
            parts = [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_url(IMAGE)}},
            ]
            job = await a.post(
                "/v1/jobs",
                json={
                    "model": VISION,
                    "messages": [{"role": "user", "content": parts}],
                    "conversation_id": conversation["id"],
                },
            )
            assert job.status_code == 202, job.text
            stored = (await a.get(f"/v1/jobs/{job.json()['id']}")).json()
            uploaded = await a.post(
                "/v1/files",
                data={"purpose": "batch"},
                files={"file": ("in.jsonl", jsonl([chat_line("a")]), "application/jsonl")},
            )
            batch = await a.post(
                "/v1/batches",
                json={
                    "input_file_id": uploaded.json()["id"],
                    "endpoint": CHAT,
                    "completion_window": "24h",
                },
            )
            assert batch.status_code == 200, batch.text
            yield Owned(
                job=stored["id"],
                conversation=conversation["id"],
                file=uploaded.json()["id"],
                batch=batch.json()["id"],
                image=hashlib.sha256(IMAGE).hexdigest(),  # stored as sent
            )
    finally:
        with Redis.from_url(in_process_api.redis_url) as redis:
            redis.hdel(MODELS_HASH, VISION)


# Every route that names an object, as B calls it with A's id. `None`: no body.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/jobs/{job_id}", None),
    ("POST", "/v1/jobs/{job_id}/cancel", None),
    ("DELETE", "/v1/jobs/{job_id}", None),
    ("GET", "/v1/jobs/{job_id}/events", None),
    ("GET", "/v1/conversations/{conversation_id}", None),
    ("DELETE", "/v1/conversations/{conversation_id}", None),
    ("GET", "/v1/files/{file_id}", None),
    ("GET", "/v1/files/{file_id}/content", None),
    ("DELETE", "/v1/files/{file_id}", None),
    ("GET", "/v1/batches/{batch_id}", None),
    ("POST", "/v1/batches/{batch_id}/cancel", None),
    ("GET", "/v1/images/{sha256}", None),
]
# Ids that name something public rather than something a key owns (the admin routes are
# the admin key's alone: tests/test_admin_keys.py).
NOT_OWNED = {("GET", "/v1/models/{model_id:path}")}


def test_every_route_with_an_id_is_covered(in_process_api: InProcessApi) -> None:
    with_ids = {
        (method, route.path)
        for route in in_process_api.app.routes
        if isinstance(route, APIRoute)
        and "{" in route.path
        and not route.path.startswith("/v1/admin/")
        for method in route.methods
    }
    assert with_ids - NOT_OWNED == {(method, path) for method, path, _ in ROUTES}


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
async def test_another_key_finds_nothing(
    in_process_api: InProcessApi,
    owned: Owned,
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    async with in_process_api.client(KEY_B) as b:
        answer = await b.request(method, owned.fill(path), json=body)
        error = assert_error(answer, 404, "not_found")
        # Nothing in the answer tells B that the object exists.
        assert "another" not in error["message"].lower()
    await _assert_untouched(in_process_api, owned)


async def _assert_untouched(api: InProcessApi, owned: Owned) -> None:
    async with api.client() as a:
        job = await a.get(f"/v1/jobs/{owned.job}")
        assert job.status_code == 200 and job.json()["status"] == "queued", job.text
        assert (await a.get(f"/v1/conversations/{owned.conversation}")).status_code == 200
        assert (await a.get(f"/v1/files/{owned.file}/content")).status_code == 200
        batch = await a.get(f"/v1/batches/{owned.batch}")
        assert batch.status_code == 200 and batch.json()["status"] not in (
            "cancelling",
            "cancelled",
        )
        image = await a.get(f"/v1/images/{owned.image}")
        assert image.status_code == 200 and image.content == IMAGE


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/conversations", "/v1/files", "/v1/batches"])
async def test_lists_show_only_the_keys_own(
    in_process_api: InProcessApi, owned: Owned, path: str
) -> None:
    async with in_process_api.client(KEY_B) as b:
        listed = await b.get(path, params={"limit": 100})
    assert listed.status_code == 200, listed.text
    ids = {item["id"] for item in listed.json()["data"]}
    assert ids.isdisjoint({owned.job, owned.conversation, owned.file, owned.batch}), (
        f"{path} shows key A's objects to key B"
    )


async def test_another_keys_ids_cannot_be_used_in_new_work(
    in_process_api: InProcessApi, owned: Owned
) -> None:
    async with in_process_api.client(KEY_B) as b:
        jobs_before = (await b.get("/v1/jobs", params={"limit": 100})).json()["data"]
        in_conversation = await b.post(
            "/v1/jobs",
            json={
                "model": TINY,
                "messages": [{"role": "user", "content": "Go on."}],
                "conversation_id": owned.conversation,
            },
        )
        assert_error(in_conversation, 404, "not_found")
        from_file = await b.post(
            "/v1/batches",
            json={"input_file_id": owned.file, "endpoint": CHAT, "completion_window": "24h"},
        )
        assert_error(from_file, 404, "not_found")
        assert (await b.get("/v1/jobs", params={"limit": 100})).json()["data"] == jobs_before
    await _assert_untouched(in_process_api, owned)


async def test_the_same_image_sent_by_both_keys_is_readable_by_both(
    in_process_api: InProcessApi, owned: Owned
) -> None:
    """Images are stored once by content; a key that sends the same bytes becomes one of
    its owners (and reads it), without the other losing it."""
    vision = ServedModel(VISION, 2048, "vllm", supports_images=True, created=now_epoch())
    with Redis.from_url(in_process_api.redis_url) as redis:
        redis.hset(MODELS_HASH, VISION, vision.to_json())
    try:
        await asyncio.sleep(2.1)  # the catalog's cache
        async with in_process_api.client(KEY_B) as b:
            assert_error(await b.get(f"/v1/images/{owned.image}"), 404, "not_found")
            parts = [{"type": "image_url", "image_url": {"url": data_url(IMAGE)}}]
            sent = await b.post(
                "/v1/jobs",
                json={"model": VISION, "messages": [{"role": "user", "content": parts}]},
            )
            assert sent.status_code == 202, sent.text
            mine = await b.get(f"/v1/images/{owned.image}")
            assert mine.status_code == 200 and mine.content == IMAGE
    finally:
        with Redis.from_url(in_process_api.redis_url) as redis:
            redis.hdel(MODELS_HASH, VISION)
    await _assert_untouched(in_process_api, owned)
