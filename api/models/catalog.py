"""The models workers serve, as the API sees them (cached for a moment), and which one a
request goes to."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from api.core.errors import (
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    ServiceUnavailable,
    served_sentence,
)
from storage.registry import ModelRegistry, ServedModel

_MODELS_CACHE_SECONDS = 2.0
# A synchronous request waiting for a worker looks this often (a cached registry read).
_WAIT_POLL_SECONDS = 0.5
# What a 503 for a model with no worker (or with too long a backlog) says to wait.
_RETRY_AFTER_SECONDS = 5


class ModelCatalog:
    """The registry's models, cached for a moment: read on every submit.

    One read at a time: when the cache runs out under a burst, every request waiting for
    it shares the one Redis read instead of each making its own, most of them on a freshly
    opened connection (bench/README.md).

    `default_model` (FERRY_DEFAULT_MODEL) and `aliases` (FERRY_MODEL_ALIASES) decide where
    a request that names no model goes: see `resolve`."""

    def __init__(
        self,
        registry: ModelRegistry,
        *,
        default_model: str | None = None,
        aliases: Iterable[str] = (),
        declared: Iterable[str] = (),
        grace_seconds: float = 60.0,
    ) -> None:
        self._registry = registry
        self._models: dict[str, ServedModel] = {}
        self.declared = tuple(declared)
        self.grace_seconds = grace_seconds
        self._expires = 0.0
        self._reading: asyncio.Task[None] | None = None
        self.default_model = default_model or None
        self.aliases = frozenset(aliases)

    async def get(self, name: str) -> ServedModel:
        model = await self._lookup(name)
        if model is None:
            raise ModelNotFound(name, list(self._models))
        return model

    async def resolve(
        self,
        name: str | None,
        wants_images: bool = False,
        *,
        default: str | None = None,
        first_served: bool = False,
    ) -> ServedModel:
        """The model a request goes to. A name that is not an alias is that model (404
        listing the served ids if it is not served). No name, or an alias: the default
        model (`default`, else FERRY_DEFAULT_MODEL, else the only model served); a request
        that carries images goes to the default if it takes images, else to the first
        served model by name that does. With several models served and no default, a 400
        lists them, unless `first_served` (the PAI-EAS routes, whose clients cannot name a
        model) takes the first by name."""
        if name is not None and name not in self.aliases:
            return await self.get(name)
        default = default or self.default_model
        chosen = None
        if default:
            chosen = await self._lookup(default)
        elif time.monotonic() >= self._expires or not self._models:
            await self._refresh()
        served = sorted(self._models.values(), key=lambda m: m.name)
        if not served:
            raise ServiceUnavailable("No model is served yet: start a worker.")
        # LoRA adapters are served beside their base model: "the only model" means the base.
        bases = [m for m in served if m.base_model is None] or served
        if chosen is None and default is None and (len(bases) == 1 or first_served):
            chosen = bases[0]
        if wants_images and (chosen is None or not chosen.supports_images):
            takers = [m for m in bases if m.supports_images]
            if takers:
                return takers[0]
            if chosen is not None:
                return chosen  # its image check answers 400, naming the model and the part
            raise InvalidRequest(
                "The request carries images, but no served model takes images. "
                + served_sentence([m.name for m in served]),
                param="model",
                code="unsupported_content",
            )
        if chosen is not None:
            return chosen
        names = [m.name for m in served]
        if default is not None:
            raise ServiceUnavailable(
                f"The default model `{default}` is not served (yet): start its worker, or "
                f"name a model. {served_sentence(names)}"
            )
        raise InvalidRequest(
            "No `model` given and no default model is set (FERRY_DEFAULT_MODEL): name one. "
            + served_sentence(names),
            param="model",
            code="model_required",
        )

    async def _lookup(self, name: str) -> ServedModel | None:
        if time.monotonic() >= self._expires or name not in self._models:
            joined = await self._refresh()
            if joined and name not in self._models:
                # The read we joined may have started just before this model's worker
                # announced it: read once more before answering 404.
                await self._refresh()
        return self._models.get(name)

    async def _refresh(self) -> bool:
        """Read the registry, or wait for the read in flight; True if it joined one. The
        read is a task of its own, so a caller that goes away does not cancel it for the
        others."""
        joined = self._reading is not None
        if self._reading is None:
            self._reading = asyncio.create_task(self._read(), name="model-catalog")
        await asyncio.shield(self._reading)
        return joined

    async def live_workers(self, name: str) -> int:
        """The model's live workers, as this process last read them (a moment ago)."""
        return (await self._registry.snapshot()).live_count(name)

    async def with_worker(self, model: ServedModel, wait_seconds: float) -> ServedModel:
        """The model once at least one worker serves it live, waiting up to
        `wait_seconds` for one (a synchronous request's answer needs it now); then 503
        `model_unavailable` with Retry-After. The model as its worker announced it (a
        declared model may not have been announced before)."""
        deadline = time.monotonic() + wait_seconds
        while not await self.live_workers(model.name):
            left = deadline - time.monotonic()
            if left <= 0:
                raise ModelUnavailable(
                    f"No worker serves the model `{model.name}` now; retry later.",
                    retry_after=_RETRY_AFTER_SECONDS,
                )
            await asyncio.sleep(min(_WAIT_POLL_SECONDS, left))
        if model.max_model_len:
            return model
        self._expires = 0.0
        return await self.get(model.name)

    async def _read(self) -> None:
        try:
            states = await self._registry.served(
                grace_seconds=self.grace_seconds, declared=self.declared, fresh=True
            )
            self._models = {name: state.model for name, state in states.items()}
            self._expires = time.monotonic() + _MODELS_CACHE_SECONDS
        finally:
            self._reading = None
