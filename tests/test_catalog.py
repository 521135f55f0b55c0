"""The API's model catalog (api/models/catalog.py) over a real Redis registry: one registry read
serves every request waiting for it, a newly announced model is found at once, and a
caller that goes away does not break the read for the others."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from api.core.errors import InvalidRequest, ModelNotFound, ServiceUnavailable
from api.models.catalog import ModelCatalog
from storage.keys import MODELS_HASH
from storage.registry import ModelRegistry, ServedModel, Snapshot
from tests.conftest import REDIS_BASE
from tests.helpers import empty_redis_db

REDIS_URL = f"{REDIS_BASE}/6"  # no test stack uses db 6


class CountingRegistry(ModelRegistry):
    """The real registry, counting its reads of Redis."""

    reads = 0

    async def _read(self) -> Snapshot:
        self.reads += 1
        return await super()._read()


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    async with empty_redis_db(REDIS_URL) as client:
        yield client


async def announce(redis: Redis, name: str) -> None:
    await redis.hset(MODELS_HASH, name, ServedModel(name, 2048, "vllm").to_json())


async def test_a_burst_on_a_cold_cache_makes_one_registry_read(redis: Redis) -> None:
    await announce(redis, "m1")
    registry = CountingRegistry(redis)
    catalog = ModelCatalog(registry)

    models = await asyncio.gather(*(catalog.get("m1") for _ in range(20)))

    assert [m.name for m in models] == ["m1"] * 20
    assert registry.reads == 1
    await catalog.get("m1")  # cached
    assert registry.reads == 1


async def test_a_model_announced_after_the_cache_filled_is_found_at_once(redis: Redis) -> None:
    await announce(redis, "m1")
    catalog = ModelCatalog(CountingRegistry(redis))
    await catalog.get("m1")

    await announce(redis, "m2")

    assert (await catalog.get("m2")).name == "m2"


async def test_unknown_models_are_404_and_share_reads(redis: Redis) -> None:
    await announce(redis, "m1")
    registry = CountingRegistry(redis)
    catalog = ModelCatalog(registry)

    results = await asyncio.gather(
        *(catalog.get("nope") for _ in range(20)), return_exceptions=True
    )

    assert all(isinstance(r, ModelNotFound) for r in results)
    # One read for the burst, and at most one more for the callers that joined it.
    assert registry.reads <= 2


async def test_a_caller_that_goes_away_does_not_cancel_the_read(redis: Redis) -> None:
    await announce(redis, "m1")
    registry = CountingRegistry(redis)
    catalog = ModelCatalog(registry)

    first = asyncio.create_task(catalog.get("m1"))
    second = asyncio.create_task(catalog.get("m1"))
    await asyncio.sleep(0)  # both are waiting on the one read now
    first.cancel()

    assert (await second).name == "m1"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert registry.reads == 1


# --- resolve: where a request that names no model goes --------------------------------


async def announce_images(redis: Redis, name: str) -> None:
    await redis.hset(
        MODELS_HASH, name, ServedModel(name, 2048, "vllm", supports_images=True).to_json()
    )


async def test_resolve_the_only_model_and_aliases(redis: Redis) -> None:
    await announce(redis, "only")
    catalog = ModelCatalog(ModelRegistry(redis), aliases=["null", "default"])
    for name in (None, "null", "default"):
        assert (await catalog.resolve(name)).name == "only"
    served = re.escape("`nope` does not exist. Served models: `only`.")
    with pytest.raises(ModelNotFound, match=served):
        await catalog.resolve("nope")


async def test_resolve_with_nothing_served_is_503(redis: Redis) -> None:
    catalog = ModelCatalog(ModelRegistry(redis))
    with pytest.raises(ServiceUnavailable, match="No model is served yet"):
        await catalog.resolve(None)


async def test_resolve_several_models_needs_a_default(redis: Redis) -> None:
    for name in ("b", "a"):
        await announce(redis, name)
    await announce_images(redis, "v")
    keys = ModelCatalog(ModelRegistry(redis))
    with pytest.raises(InvalidRequest, match=re.escape("Served models: `a`, `b`, `v`.")) as caught:
        await keys.resolve(None)
    assert caught.value.code == "model_required" and caught.value.param == "model"
    # The PAI-EAS routes take the first by name, or their own default.
    assert (await keys.resolve(None, first_served=True)).name == "a"
    assert (await keys.resolve(None, default="b", first_served=True)).name == "b"
    defaulted = ModelCatalog(ModelRegistry(redis), default_model="b")
    assert (await defaulted.resolve(None)).name == "b"
    # A default that is not served (yet) is the server's problem, not the request's.
    missing = ModelCatalog(ModelRegistry(redis), default_model="gone")
    with pytest.raises(ServiceUnavailable, match="`gone` is not served"):
        await missing.resolve(None)


async def test_resolve_images_go_to_a_model_that_takes_them(redis: Redis) -> None:
    for name in ("a", "b"):
        await announce(redis, name)
    catalog = ModelCatalog(ModelRegistry(redis), default_model="a")
    with pytest.raises(InvalidRequest, match="no served model takes images") as caught:
        await ModelCatalog(ModelRegistry(redis)).resolve(None, wants_images=True)
    assert caught.value.code == "unsupported_content"
    # With a default that takes no images and none that does, the default is the answer:
    # its own image check then names it.
    assert (await catalog.resolve(None, wants_images=True)).name == "a"
    await announce_images(redis, "w")
    await announce_images(redis, "v")
    catalog = ModelCatalog(ModelRegistry(redis), default_model="a")
    assert (await catalog.resolve(None, wants_images=True)).name == "v"  # first by name
    assert (await catalog.resolve(None, wants_images=False)).name == "a"
    assert (await catalog.resolve("b", wants_images=True)).name == "b"  # named: as is
    images_default = ModelCatalog(ModelRegistry(redis), default_model="w")
    assert (await images_default.resolve(None, wants_images=True)).name == "w"
