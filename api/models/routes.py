"""`GET /v1/models` and `GET /v1/models/{id}`: the models live workers announce."""

from __future__ import annotations

from fastapi import APIRouter

from api.core.deps import CurrentKey, StateDep
from api.core.errors import ModelNotFound, error_responses
from api.openai.schemas import ModelCard, ModelList

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(_: CurrentKey, state: StateDep) -> ModelList:
    """Models served by this deployment, as OpenAI's list, with vLLM's `max_model_len`
    and Ferry's `engine`, `supports_images` and `live_workers` (also `workers`): those with
    a live worker, those whose last worker went less than FERRY_MODEL_GRACE_SECONDS ago,
    and those declared in FERRY_MODELS (with no worker yet: `live_workers` 0)."""
    catalog = state.catalog
    # Read now, not the shared snapshot: a client that just started a worker asks this.
    served = await state.registry.served(
        grace_seconds=catalog.grace_seconds, declared=catalog.declared, fresh=True
    )
    return ModelList(
        data=[
            ModelCard(
                id=m.name,
                created=m.created,
                max_model_len=m.max_model_len,
                engine=m.engine,
                supports_images=m.supports_images,
                supports_structured_output=m.supports_structured_output,
                workers=live,
                live_workers=live,
                root=m.root or m.name,
                parent=m.base_model,
            )
            for m, live in sorted(
                ((s.model, s.live_workers) for s in served.values()), key=lambda p: p[0].name
            )
        ]
    )


# `:path`: hub ids such as `HuggingFaceTB/SmolLM2-135M-Instruct` contain "/".
@router.get(
    "/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404)
)
async def retrieve_model(model_id: str, key: CurrentKey, state: StateDep) -> ModelCard:
    """One served model (OpenAI `models.retrieve`): the card the list gives it; 404
    listing the served ids for any other id."""
    cards = (await list_models(key, state)).data
    for card in cards:
        if card.id == model_id:
            return card
    raise ModelNotFound(model_id, [card.id for card in cards])
