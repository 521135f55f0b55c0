"""The API's model catalog (api/catalog.py) over a real Redis registry: one registry read
serves every request waiting for it, a newly announced model is found at once, and a
caller that goes away does not break the read for the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from api.catalog import ModelCatalog
from api.errors import ModelNotFound
from storage.keys import MODELS_HASH
from storage.registry import ModelRegistry, ServedModel
from tests.conftest import REDIS_BASE
from tests.helpers import empty_redis_db

REDIS_URL = f"{REDIS_BASE}/6"  # no test stack uses db 6


class CountingRegistry(ModelRegistry):
    """The real registry, counting its reads of the models hash."""

    reads = 0

    async def models(self) -> dict[str, ServedModel]:
        self.reads += 1
        return await super().models()


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

    results = await asyncio.gather(*(catalog.get("nope") for _ in range(20)),
                                   return_exceptions=True)

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
