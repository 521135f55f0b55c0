"""Ferry's Redis clients are redis-py's own (`Redis.from_url`): commands and pipelines
carry any text and bytes through Redis unchanged."""

from __future__ import annotations

import pytest

from tests.conftest import REDIS_BASE
from tests.helpers import empty_redis_db

pytestmark = pytest.mark.timeout(60)


async def test_commands_and_pipelines_round_trip_through_redis() -> None:
    async with empty_redis_db(f"{REDIS_BASE}/14") as client:
        text = "\u00e9t\u00e9 \U0001f600 \r\n$5\r\n"  # protocol-looking text stays text
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("a", text).rpush("b", 1, 2.5, b"\x00").lrange("b", 0, -1)
            results = await pipe.execute()
        assert results == [True, 3, [b"1", b"2.5", b"\x00"]]
        assert (await client.get("a")).decode() == text
