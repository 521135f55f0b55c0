"""The models workers serve, as the API sees them (cached for a moment)."""

from __future__ import annotations

import time

from api.errors import ModelNotFound
from storage.registry import ModelRegistry, ServedModel

_MODELS_CACHE_SECONDS = 2.0


class ModelCatalog:
    """The registry's models, cached for a moment: read on every submit."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry
        self._models: dict[str, ServedModel] = {}
        self._expires = 0.0

    async def get(self, name: str) -> ServedModel:
        if time.monotonic() >= self._expires or name not in self._models:
            self._models = await self._registry.models()
            self._expires = time.monotonic() + _MODELS_CACHE_SECONDS
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model
