"""Which models are served, and by which live workers (heartbeats in Redis).

A worker writes its heartbeat key (expiring) and its model's entry in the models hash
(persistent, so a model stays known to the API while its workers restart).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields

from redis.asyncio import Redis

from storage.keys import MODELS_HASH, WORKER_KEY_PREFIX, worker_key


@dataclass(frozen=True, slots=True)
class ServedModel:
    name: str
    max_model_len: int
    engine: str
    supports_images: bool = False
    # The engine can constrain output to JSON / a JSON schema (`response_format`).
    supports_structured_output: bool = False
    created: int = 0
    # vLLM's reasoning parser name (e.g. `deepseek_r1`, `qwen3`): the API splits the
    # model's `<think>` text out of its replies as `reasoning_content`.
    reasoning_parser: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ServedModel:
        return cls(**json.loads(raw))


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


class ModelRegistry:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def heartbeat(self, beat: WorkerBeat, model: ServedModel, ttl_seconds: float) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(worker_key(beat.worker_id), json.dumps(asdict(beat)), px=int(ttl_seconds * 1000))
        pipe.hset(MODELS_HASH, model.name, model.to_json())
        await pipe.execute()

    async def forget_worker(self, worker_id: str) -> None:
        await self._redis.delete(worker_key(worker_id))

    async def models(self) -> dict[str, ServedModel]:
        raw = await self._redis.hgetall(MODELS_HASH)
        models = (ServedModel.from_json(v) for v in raw.values())
        return {m.name: m for m in models}

    async def live_workers(self) -> list[WorkerBeat]:
        keys = [k async for k in self._redis.scan_iter(match=f"{WORKER_KEY_PREFIX}*", count=500)]
        if not keys:
            return []
        values = await self._redis.mget(keys)
        known = {f.name for f in fields(WorkerBeat)}
        # Fields a newer worker announces and this process does not know are ignored.
        return [WorkerBeat(**{k: v for k, v in json.loads(raw).items() if k in known})
                for raw in values if raw is not None]


def now_epoch() -> int:
    return int(time.time())
