"""Which models are served, and by which live workers (heartbeats in Redis).

A worker's heartbeat scores its id in a sorted set by when the beat expires (Redis TIME
plus its TTL, so every reader uses the one clock), stores the beat in a hash beside it,
and writes its model's entry in the models hash (persistent, so a model stays known while
its workers restart) and when that model's beat expires (`MODELS_SEEN`). A read takes the
members whose beat has not expired and prunes the others: no key is ever found by SCAN.

One read per process at a time, cached for a moment (`snapshot`): the dispatcher, the
batch feeder, `/health` and the model catalog share it; `/v1/models` reads afresh.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import redis as sync_redis
from redis.asyncio import Redis

from storage.keys import MODELS_HASH, MODELS_SEEN, WORKER_BEATS, WORKERS_LIVE

log = logging.getLogger(__name__)

# How long one read of the live workers serves every caller in the process.
SNAPSHOT_SECONDS = 0.5
# At most this many expired workers are pruned per read (the rest on the next ones).
_PRUNE_BATCH = 1000

# KEYS: live set, beats hash, models-seen set. ARGV: ttl, worker id, beat JSON, models...
_BEAT = """
local t = redis.call('TIME')
local expires = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
redis.call('ZADD', KEYS[1], expires, ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[3], expires, ARGV[i])
end
return 1
"""

# KEYS: live set, beats hash, models-seen set. Returns Redis's time, the live beats and
# the models-seen scores; prunes expired members first.
_READ = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local stale = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
if #stale > 0 then
  redis.call('ZREM', KEYS[1], unpack(stale))
  redis.call('HDEL', KEYS[2], unpack(stale))
end
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
local beats = {}
if #live > 0 then
  beats = redis.call('HMGET', KEYS[2], unpack(live))
end
return {tostring(now), beats, redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')}
"""


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    max_model_len: int
    engine: str
    supports_images: bool = False
    # The engine can constrain output to JSON / a JSON schema (`response_format`).
    supports_structured_output: bool = False
    created: int = 0
    # A LoRA adapter (`--lora-modules`) names the model it runs on; its jobs are run by the
    # workers that serve that model with it.
    base_model: str | None = None
    # vLLM's parsers by name (`--reasoning-parser`, `--tool-call-parser`).
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    # What the model was loaded from (hub id, directory; an adapter's path): vLLM's `root`.
    root: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ServedModel:
        return cls(**_known(cls, json.loads(raw)))


def _known(cls: Any, data: dict[str, Any]) -> dict[str, Any]:
    """Fields a newer process writes and this one does not know are ignored."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    worker_id: str
    model: str
    engine: str
    in_flight: int
    at: float
    # Engine slots (jobs in the engine at once). 0: not announced.
    concurrency: int = 0
    # How many batch lines the worker takes at once (in its engine or waiting at its
    # gate, worker/admission.py): while it has no interactive job, and while it has.
    # The batch feeder keeps that many out. 0: not announced.
    bulk_window: int = 0
    bulk_window_busy: int = 0
    # The LoRA adapters it serves on its model's engine (each a model of its own).
    adapters: tuple[str, ...] = ()

    def serves(self, model: str) -> bool:
        return model == self.model or model in self.adapters

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerBeat:
        beat = _known(cls, json.loads(raw))
        return cls(**{**beat, "adapters": tuple(beat.get("adapters") or ())})


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of the registry: Redis's clock then, the live workers, the models known,
    and when each model's last beat expires (absent: announced without a worker)."""

    now: float
    workers: tuple[WorkerBeat, ...]
    models: dict[str, ServedModel]
    seen: dict[str, float]

    def live_count(self, model: str) -> int:
        return sum(beat.serves(model) for beat in self.workers)


@dataclass(frozen=True, slots=True)
class ModelState:
    model: ServedModel
    live_workers: int


def placeholder_model(name: str) -> ServedModel:
    """A declared model no worker has announced yet: its context is not known (0)."""
    return ServedModel(name, max_model_len=0, engine="")


class ModelRegistry:
    def __init__(self, redis: Redis, *, snapshot_seconds: float = SNAPSHOT_SECONDS) -> None:
        self._redis = redis
        self._beat = redis.register_script(_BEAT)
        self._read_script = redis.register_script(_READ)
        self._snapshot_seconds = snapshot_seconds
        self._snapshot: Snapshot | None = None
        self._expires = 0.0
        self._reading: asyncio.Task[Snapshot] | None = None
        self._on_new_worker: list[Callable[[], None]] = []

    async def heartbeat(
        self,
        beat: WorkerBeat,
        model: ServedModel,
        ttl_seconds: float,
        adapters: Sequence[ServedModel] = (),
    ) -> None:
        models = (model, *adapters)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(MODELS_HASH, mapping={m.name: m.to_json() for m in models})
        await self._beat(
            keys=[WORKERS_LIVE, WORKER_BEATS, MODELS_SEEN],
            args=[ttl_seconds, beat.worker_id, json.dumps(asdict(beat)), *(m.name for m in models)],
            client=pipe,
        )
        await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(WORKERS_LIVE, worker_id)
        pipe.hdel(WORKER_BEATS, worker_id)
        await pipe.execute()
        self.invalidate()

    def on_new_worker(self, callback: Callable[[], None]) -> None:
        """Call `callback` when a read finds a worker the previous read did not (the batch
        feeder then feeds at once rather than on its timer)."""
        self._on_new_worker.append(callback)

    def invalidate(self) -> None:
        self._expires = 0.0

    async def models(self) -> dict[str, ServedModel]:
        """Every model announced to this Redis, live or not (the batch supervisor's)."""
        raw = await self._redis.hgetall(MODELS_HASH)
        models = (ServedModel.from_json(v) for v in raw.values())
        return {m.name: m for m in models}

    async def live_workers(self) -> list[WorkerBeat]:
        return list((await self.snapshot()).workers)

    async def snapshot(self, *, fresh: bool = False) -> Snapshot:
        """The registry as last read, if that was under `snapshot_seconds` ago (else read
        now; callers arriving meanwhile share that read)."""
        if not fresh and self._snapshot is not None and time.monotonic() < self._expires:
            return self._snapshot
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(), name="model-registry")
        return await asyncio.shield(self._reading)

    async def served(
        self, *, grace_seconds: float, declared: Iterable[str] = (), fresh: bool = False
    ) -> dict[str, ModelState]:
        """The models requests may name: those with a live worker, those whose last worker
        went less than `grace_seconds` ago, those announced without a worker (by hand, as
        tools do), and the `declared` ones (FERRY_MODELS) whatever their workers."""
        snap = await self.snapshot(fresh=fresh)
        out: dict[str, ModelState] = {}
        declared = set(declared)
        for name, model in snap.models.items():
            live = snap.live_count(name)
            seen = snap.seen.get(name)
            if live or name in declared or seen is None or seen + grace_seconds > snap.now:
                out[name] = ModelState(model, live)
        for name in declared - out.keys():
            out[name] = ModelState(placeholder_model(name), snap.live_count(name))
        return out

    async def _read(self) -> Snapshot:
        try:
            pipe = self._redis.pipeline(transaction=False)
            await self._read_script(
                keys=[WORKERS_LIVE, WORKER_BEATS, MODELS_SEEN], args=[_PRUNE_BATCH], client=pipe
            )
            pipe.hgetall(MODELS_HASH)
            (now, beats, seen), raw_models = await pipe.execute()
            workers = tuple(WorkerBeat.from_json(raw) for raw in beats if raw is not None)
            snap = Snapshot(
                now=float(now),
                workers=workers,
                models={m.name: m for m in (ServedModel.from_json(v) for v in raw_models.values())},
                seen={_text(seen[i]): float(seen[i + 1]) for i in range(0, len(seen), 2)},
            )
            previous = self._snapshot
            self._snapshot, self._expires = snap, time.monotonic() + self._snapshot_seconds
            if previous is not None:
                before = {w.worker_id for w in previous.workers}
                if any(w.worker_id not in before for w in workers):
                    for callback in self._on_new_worker:
                        callback()
            return snap
        finally:
            self._reading = None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def live_worker_ids(client: sync_redis.Redis) -> list[str]:
    """The ids of the live workers, read without pruning (health checks, tests, bench)."""
    seconds, micros = client.time()
    members: list[str | bytes] = client.zrangebyscore(  # type: ignore[assignment]
        WORKERS_LIVE, f"({seconds + micros / 1e6}", "+inf"
    )
    return [_text(m) for m in members]


def announce(
    client: sync_redis.Redis,
    model: ServedModel,
    *,
    worker: WorkerBeat | None = None,
    ttl_seconds: float = 3600.0,
) -> None:
    """Write a model as a worker's heartbeat would, with `worker` as its live worker for
    `ttl_seconds` (tools and tests that announce a model no process serves)."""
    client.hset(MODELS_HASH, model.name, model.to_json())
    if worker is not None:
        script = client.register_script(_BEAT)
        script(
            keys=[WORKERS_LIVE, WORKER_BEATS, MODELS_SEEN],
            args=[ttl_seconds, worker.worker_id, json.dumps(asdict(worker)), model.name],
        )


def now_epoch() -> int:
    return int(time.time())
