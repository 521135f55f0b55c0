"""Which models are served, and by which live workers (heartbeats in Redis).

A worker writes its heartbeat key (expiring) and its model's entry in the models hash
(persistent, so a model stays known to the API while its workers restart).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

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


class ModelRegistry:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def heartbeat(
        self,
        beat: WorkerBeat,
        model: ServedModel,
        ttl_seconds: float,
        adapters: Sequence[ServedModel] = (),
    ) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(worker_key(beat.worker_id), json.dumps(asdict(beat)), px=int(ttl_seconds * 1000))
        pipe.hset(MODELS_HASH, mapping={m.name: m.to_json() for m in (model, *adapters)})
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
        beats = [_known(WorkerBeat, json.loads(raw)) for raw in values if raw is not None]
        return [
            WorkerBeat(**{**beat, "adapters": tuple(beat.get("adapters") or ())}) for beat in beats
        ]


def now_epoch() -> int:
    return int(time.time())
