"""Ferry's asyncio Redis clients pack commands with hiredis (storage/redis_client.py), over
the transport their URL names, sending the bytes redis-py's own packing sends."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError

from storage.redis_client import redis_from_url
from tests.conftest import REDIS_BASE
from tests.helpers import empty_redis_db

pytestmark = pytest.mark.timeout(60)

COMMANDS = [
    ("EVALSHA", "f" * 40, 2, "ferry:job:a:events", "ferry:job:b:events", 1000, 86400,
     "1-7", "delta", '{"text": "\u00e9t\u00e9 \U0001f600 \\" end", "ts": 1.5}', b"raw\x00\xff",
     1.5, 0.1, -3, 2**70, ""),
    ("CLIENT KILL", "ID", 7),  # redis-py splits a command name holding a space
    (b"CONFIG GET", "maxmemory"),
]


@pytest.mark.parametrize(("url", "base"), [
    (f"{REDIS_BASE}/14", Connection),
    ("rediss://127.0.0.1:6380/0", SSLConnection),
    ("unix:///tmp/ferry-test-absent.sock?db=3", UnixDomainSocketConnection),
])
def test_a_client_packs_in_c_over_its_urls_own_transport(url: str, base: type) -> None:
    pool = redis_from_url(url).connection_pool
    assert issubclass(pool.connection_class, base) and pool.connection_class is not base
    connection = pool.make_connection()
    python_packed = Connection()  # redis-py's asyncio packing, in Python
    for command in COMMANDS:
        assert b"".join(connection.pack_command(*command)) == b"".join(
            python_packed.pack_command(*command))
    with pytest.raises(DataError):
        connection.pack_command("SET", "k", {"not": "encodable"})


async def test_commands_and_pipelines_round_trip_through_redis() -> None:
    async with empty_redis_db(f"{REDIS_BASE}/14") as client:
        text = "\u00e9t\u00e9 \U0001f600 \r\n$5\r\n"  # protocol-looking text stays text
        async with client.pipeline(transaction=True) as pipe:
            pipe.set("a", text).rpush("b", 1, 2.5, b"\x00").lrange("b", 0, -1)
            results = await pipe.execute()
        assert results == [True, 3, [b"1", b"2.5", b"\x00"]]
        assert (await client.get("a")).decode() == text
