"""The asyncio Redis clients of Ferry's processes (API, worker), made in one place.

redis-py's asyncio connections pack every command in Python (its synchronous ones use
hiredis's C packer). The worker's per-flush command carries six arguments per job event
(storage/events.py), and packing it in Python was about half of what writing an event cost
the worker (bench/README.md). So these clients pack
with hiredis through redis-py's own `HiredisRespSerializer`, which is what the synchronous
client does with the same arguments: the bytes sent are identical. Without hiredis
installed they are redis-py's plain connections.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

_SERIALIZER = HiredisRespSerializer()  # type: ignore[no-untyped-call]  # stateless


class _HiredisPacking:
    """Mixin for an asyncio connection class: pack commands in C."""

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = _SERIALIZER.pack(*args)
        return packed


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _packing(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """`base` with hiredis packing (one class per base, made once)."""
    if base not in _PACKING:
        _PACKING[base] = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    return _PACKING[base]


def redis_from_url(url: str, **kwargs: Any) -> Redis:
    """`Redis.from_url(url, **kwargs)` with hiredis packing (TCP, TLS or Unix socket, as
    the URL says: the pool's connection class is the URL's, with packing mixed in)."""
    client: Redis = Redis.from_url(url, **kwargs)
    pool = client.connection_pool
    if HIREDIS_AVAILABLE and not issubclass(pool.connection_class, _HiredisPacking):
        pool.connection_class = _packing(pool.connection_class)  # before any connection
    return client
