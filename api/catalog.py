"""The models workers serve, as the API sees them (cached for a moment)."""

from __future__ import annotations

import asyncio
import time

from api.errors import ModelNotFound
from storage.registry import ModelRegistry, ServedModel

_MODELS_CACHE_SECONDS = 2.0


class ModelCatalog:
    """The registry's models, cached for a moment: read on every submit.

    One read at a time: when the cache runs out under a burst, every request waiting for
    it shares the one Redis read instead of each making its own (64 concurrent submits
    made 64 reads, most on a freshly opened connection: ~15% of the API's time in
    bench/pipeline.py's burst, py-spy)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._models: dict[str, ServedModel] = {}
        self._expires = 0.0
        self._reading: asyncio.Task[None] | None = None

    async def get(self, name: str) -> ServedModel:
        if time.monotonic() >= self._expires or name not in self._models:
            joined = await self._refresh()
            if joined and name not in self._models:
                # The read we joined may have started just before this model's worker
                # announced it: read once more before answering 404.
                await self._refresh()
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    async def _refresh(self) -> bool:
        """Read the registry, or wait for the read in flight; True if it joined one. The
        read is a task of its own, so a caller that goes away does not cancel it for the
        others."""
        joined = self._reading is not None
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(), name="model-catalog")
        await asyncio.shield(self._reading)
        return joined

    async def _read(self) -> None:
        try:
            self._models = await self._registry.models()
            self._expires = time.monotonic() + _MODELS_CACHE_SECONDS
        finally:
            self._reading = None
