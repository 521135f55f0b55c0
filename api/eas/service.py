"""The PAI-EAS APIs' path onto Ferry's queue: which model, the job, its text as it comes.

EAS requests name no model: they go where a request without `model` goes
(`ModelCatalog.resolve`), with `FERRY_EAS_MODEL` as their own default (else
`FERRY_DEFAULT_MODEL`), and, with neither set, the first served model by name. Their token limits
(`max_new_tokens`, `max_output_tokens`) are ceilings, as on EAS: the oldest history turns
and the limit itself give way to the model's context (`api.conversations.history.fit_to_context`).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from api.conversations import history
from api.core.errors import InvalidRequest, job_failure
from api.core.state import AppState
from api.jobs import service as jobs_service
from api.models.catalog import ModelCatalog
from api.openai.schemas import ChatCompletionRequest, ChatMessage
from api.streaming.job_events import job_events
from storage.content import ImageRef, image_part, text_part
from storage.events import EventType
from storage.models import Job
from storage.registry import ServedModel
from storage.stored_request import StoredRequest


@dataclass(frozen=True, slots=True)
class Turn:
    """One EAS question with its sampling knobs."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None = None
    system_prompt: str = ""
    image: ImageRef | None = None


async def pick_model(
    catalog: ModelCatalog, default: str | None, *, with_image: bool
) -> ServedModel:
    """The model for an EAS request: its default (`FERRY_EAS_MODEL`), or one that takes
    images for a request that carries one (the same resolver as `/v1` requests that name
    no model)."""
    return await catalog.resolve(None, with_image, default=default, first_served=True)


def check_takes_images(model: ServedModel) -> None:
    if not model.supports_images:
        raise InvalidRequest(
            f"The model `{model.name}` does not take images; serve one that does (or set "
            "FERRY_EAS_MODEL to it).",
            param="image",
            code="unsupported_content",
        )


async def build_job(
    state: AppState,
    owner_id: str,
    model: ServedModel,
    turn: Turn,
    past: Sequence[dict[str, Any]],
    conversation_id: str | None,
    past_tokens: Sequence[int | None] = (),
) -> Job:
    """The job for one EAS turn, through `build_chat_job` like every chat request.

    `past` is the history (prompt messages; `past_tokens` their token counts where
    known); with a `conversation_id` the turn and its reply are appended to that
    conversation when the job succeeds."""
    # Every EAS route waits for its answer: a worker must serve the model (and the
    # model as that worker announced it, for its context).
    model = await jobs_service.admit(state, model, sync=True)
    messages = []
    if turn.system_prompt:
        messages.append(ChatMessage(role="system", content=turn.system_prompt))
    messages.append(ChatMessage(role="user", content=turn.prompt))
    body = ChatCompletionRequest(
        model=model.name,
        messages=messages,
        temperature=turn.temperature,
        top_p=turn.top_p,
        top_k=turn.top_k,
        max_tokens=max(1, min(turn.max_tokens, model.max_model_len - 1)),
    )
    job = await jobs_service.build_chat_job(state, owner_id, body, admitted=True)
    request = StoredRequest.load(job.request)
    if turn.image is not None and request.messages:
        request.messages[-1]["content"] = [image_part(turn.image), text_part(turn.prompt)]
    history.splice(request, past)
    history.fit_to_context(request, model.max_model_len, turn.max_tokens, past_tokens)
    job.request = request.dump()
    job.conversation_id = conversation_id
    return job


async def text_deltas(state: AppState, job_id: str) -> AsyncGenerator[str, None]:
    """The job's text as it is generated. Ends when the job ends; a failed job raises
    its error (`api.core.errors.job_failure`), as does one that expired unrun. A client
    that goes away (this generator closed or cancelled before the end) cancels the job."""
    finished = False
    try:
        async for event in job_events(
            state.event_sources,
            job_id,
            None,
            keepalive_seconds=state.settings.sse_keepalive_seconds,
            max_seconds=state.settings.sse_max_seconds,
        ):
            if event is None:
                continue
            if event.type == EventType.DELTA and event.data["text"]:
                yield event.data["text"]
            elif event.type in (EventType.ERROR, EventType.EXPIRED):
                finished = True
                raise job_failure(event.data.get("message"), event.data.get("code"))
            elif event.type.is_terminal:
                finished = True
                return
        finished = True
    finally:
        if not finished:
            with anyio.CancelScope(shield=True):
                await jobs_service.cancel_quietly(state, job_id)


async def finished(state: AppState, job_id: str) -> Job:
    """Wait for the job to end; its row (a failed job raises `FerryError`)."""
    return await jobs_service.wait_for_end(state, job_id)
