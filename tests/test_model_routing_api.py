"""Which model a request goes to (`model` omitted, aliases, images), `GET /v1/models/{id}`,
authentication off, and content parts no model takes, on the API in process.

Three apps (tests/fixtures/api.py) share a database and a Redis db with models announced
in the registry and no worker behind them: keys and no default model, a default model,
and authentication off (default model too). A job is stored (202) with the model it
resolved to, which is all routing decides."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from redis import Redis

from api.core.settings import ApiSettings
from storage.registry import ServedModel, WorkerBeat, announce, now_epoch
from tests.conftest import KEY_A, KEY_B, REDIS_BASE, new_database
from tests.fixtures.api import InProcessApi, running_api
from tests.helpers import assert_error
from tests.routing import HUB_ID, SERVED, TEXT_A, TEXT_B, VISION, chat, image_carriers

pytestmark = pytest.mark.timeout(120)

ROUTING_REDIS_DB = 2  # no test stack uses db 2


@dataclass
class Apps:
    keys: InProcessApi
    default: InProcessApi
    open: InProcessApi


@pytest.fixture(scope="module")
def routing_database() -> Iterator[str]:
    with new_database("ferry_test_routing") as url:
        yield url


@pytest.fixture(scope="module")
async def apps(
    routing_database: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Apps]:
    redis_url = f"{REDIS_BASE}/{ROUTING_REDIS_DB}"
    with Redis.from_url(redis_url) as client:
        client.flushdb()
        # As workers would, each with a live worker (no process): synchronous requests do
        # not wait for one.
        for name in (TEXT_A, TEXT_B, HUB_ID):
            model = ServedModel(name, 2048, "vllm", created=now_epoch())
            announce(client, model, worker=WorkerBeat(name, name, "vllm", 0, time.time()))
        vision = ServedModel(VISION, 2048, "vllm", supports_images=True, created=now_epoch())
        announce(client, vision, worker=WorkerBeat(VISION, VISION, "vllm", 0, time.time()))
    objects = tmp_path_factory.mktemp("routing-objects")
    default = ApiSettings(api_keys=[KEY_A, KEY_B], default_model=TEXT_B)
    async with (
        running_api(routing_database, redis_url, objects) as keys,
        running_api(routing_database, redis_url, objects, default) as with_default,
        running_api(
            routing_database, redis_url, objects, default.model_copy(update={"auth": "off"})
        ) as open_,
    ):
        yield Apps(keys, with_default, open_)


async def submitted_model(
    client: httpx.AsyncClient, body: dict[str, Any], route: str = "/v1/jobs"
) -> str:
    """The model a stored job went to, as its row says."""
    response = await client.post(route, json=body)
    assert response.status_code == 202, response.text
    job = (await client.get(f"/v1/jobs/{response.json()['id']}")).json()
    model: str = job["model"]
    return model


# --- which model --------------------------------------------------------------------


@pytest.mark.parametrize("model", [None, "null", "default"])
async def test_no_model_or_alias_goes_to_the_default_model(apps: Apps, model: str | None) -> None:
    body = chat() if model is None else chat(model=model)
    async with apps.default.client() as client:
        assert await submitted_model(client, body) == TEXT_B


@pytest.mark.parametrize("model", [None, "null"])
async def test_several_models_and_no_default_is_400_listing_them(
    apps: Apps, model: str | None
) -> None:
    body = chat() if model is None else chat(model=model)
    async with apps.keys.client() as client:
        before = (await client.get("/v1/jobs", params={"limit": 100})).json()["data"]
        error = assert_error(await client.post("/v1/jobs", json=body), 400, "model_required")
        chat_error = assert_error(
            await client.post("/v1/chat/completions", json=body), 400, "model_required"
        )
        after = (await client.get("/v1/jobs", params={"limit": 100})).json()["data"]
    assert error["param"] == "model" and chat_error == error
    for name in SERVED:
        assert f"`{name}`" in error["message"]
    assert after == before  # nothing stored


@pytest.mark.parametrize("carrier", range(3), ids=["image_url", "swift-images", "img-tag"])
@pytest.mark.parametrize("which", ["keys", "default"])
async def test_images_without_model_go_to_a_model_that_takes_them(
    apps: Apps, carrier: int, which: str
) -> None:
    app = apps.keys if which == "keys" else apps.default
    body = image_carriers()[carrier]
    async with app.client() as client:
        assert await submitted_model(client, body) == VISION
        assert await submitted_model(client, {**body, "model": "null"}) == VISION
        # A named model is that model: a text one refuses the images, naming itself (for
        # a text model an `<img>` tag is plain text).
        named = await client.post("/v1/jobs", json={**body, "model": TEXT_A})
        if carrier == 2:
            assert named.status_code == 202 and named.json()["model"] == TEXT_A
        else:
            error = assert_error(named, 400, "unsupported_content")
            assert f"`{TEXT_A}`" in error["message"]


async def test_unknown_model_is_404_listing_the_served_ids(apps: Apps) -> None:
    async with apps.default.client() as client:
        for route in ("/v1/jobs", "/v1/chat/completions"):
            error = assert_error(
                await client.post(route, json=chat(model="no-such-model")), 404, "model_not_found"
            )
            assert error["param"] == "model"
            assert "`no-such-model`" in error["message"]
            for name in SERVED:
                assert f"`{name}`" in error["message"]


# --- models.retrieve ---------------------------------------------------------------


async def test_models_retrieve_gives_the_list_card(apps: Apps) -> None:
    async with apps.keys.sdk(KEY_A) as client:
        listed = {m.id: m.model_dump() for m in (await client.models.list()).data}
        assert sorted(listed) == sorted(SERVED)
        for name in (TEXT_A, VISION, HUB_ID):  # a hub id has a "/" in it
            card = await client.models.retrieve(name)
            assert card.id == name
            assert card.model_dump() == listed[name]
        with pytest.raises(openai.NotFoundError) as caught:
            await client.models.retrieve("no-such-model")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found", error
    assert all(f"`{name}`" in error["message"] for name in SERVED)
    async with apps.keys.client(key="sk-wrong") as raw:
        assert_error(await raw.get(f"/v1/models/{TEXT_A}"), 401)


# --- authentication off ------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "EMPTY", "null", "sk-not-a-key"])
async def test_auth_off_takes_every_request_as_one_owner(apps: Apps, key: str | None) -> None:
    async with apps.open.client(key=key) as client:
        assert (await client.get("/v1/models")).status_code == 200
        response = await client.post("/v1/jobs", json=chat())
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        # Whoever sends it, it is the same owner's job.
        async with apps.open.client(key=None) as other:
            assert (await other.get(f"/v1/jobs/{job_id}")).status_code == 200
    # With keys on, the same requests are refused.
    async with apps.default.client(key=key) as client:
        assert_error(await client.get("/v1/models"), 401)
        assert_error(await client.post("/v1/jobs", json=chat()), 401)
        assert_error(await client.get(f"/v1/jobs/{job_id}"), 401)


# --- parts no model takes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "named"),
    [
        ({"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}}, "video"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "file", "file": {"file_id": "file-1"}}, "file"),
    ],
)
@pytest.mark.parametrize("model", [TEXT_A, VISION, None])
async def test_video_audio_file_parts_are_400_naming_them(
    apps: Apps, part: dict[str, Any], named: str, model: str | None
) -> None:
    body = chat([{"type": "text", "text": "What happens here?"}, part])
    if model is not None:
        body["model"] = model
    async with apps.default.client() as client:
        error = assert_error(
            await client.post("/v1/chat/completions", json=body), 400, "unsupported_content"
        )
    assert error["param"] == "messages.0.content.1"
    assert named in error["message"] and part["type"] in error["message"]
    assert f"`{model or TEXT_B}`" in error["message"]
