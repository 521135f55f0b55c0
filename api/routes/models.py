"""`GET /v1/models`: the models live workers announce."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentKey, StateDep
from api.schemas.openai import ModelCard, ModelList

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList)
async def list_models(_: CurrentKey, state: StateDep) -> ModelList:
    """Models served by this deployment, as OpenAI's list, with vLLM's `max_model_len`
    and Ferry's `engine`, `supports_images` and live `workers` count."""
    models = await state.registry.models()
    beats = await state.registry.live_workers()
    return ModelList(data=[
        ModelCard(id=m.name, created=m.created, max_model_len=m.max_model_len,
                  engine=m.engine, supports_images=m.supports_images,
                  supports_structured_output=m.supports_structured_output,
                  workers=sum(beat.serves(m.name) for beat in beats),
                  root=m.root or m.name, parent=m.base_model)
        for m in sorted(models.values(), key=lambda m: m.name)
    ])
