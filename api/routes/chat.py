"""OpenAI-compatible `POST /v1/chat/completions`: a job underneath, waited on or streamed."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api import jobs_service
from api.deps import CurrentKey, StateDep
from api.errors import stream_error
from api.job_events import job_event_batches
from api.schemas.openai import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Usage,
    chunk,
)
from api.state import AppState
from storage.content import ReasoningSplitter, split_reasoning
from storage.events import EventType, JobEvent
from storage.models import Job, JobStatus

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, key: CurrentKey, state: StateDep
) -> Any:
    """OpenAI chat completions, through the same queue and workers as `/v1/jobs`.

    With `stream: true` the answer is `chat.completion.chunk` events ending in
    `data: [DONE]`; `stream_options.include_usage` adds a final usage chunk. The
    completion id is the job id (`GET /v1/jobs/{id}` works on it). A streaming client
    that disconnects cancels its job, as in vLLM.

    Thinking (`chat_template_kwargs.enable_thinking` or FastDeploy's
    `metadata.enable_thinking`): a reply that opens with `<think>` is split into
    `reasoning_content` (up to `</think>`) and `content`, streamed or not.
    `response_format` (`json_object`, `json_schema`) constrains the output through vLLM's
    structured outputs; a model served by an engine that cannot is a 400.
    """
    job = await jobs_service.build_chat_job(state, key, body)
    await jobs_service.submit(state, [job])
    headers = {"X-Ferry-Job-Id": job.id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(state, job, include_usage, body.thinking), media_type="text/event-stream",
            headers=headers,
        )
    final = await jobs_service.wait_for_end(state, job.id)
    return _completion(final, body.thinking)


def _completion(job: Job, thinking: bool) -> ChatCompletion:
    prompt, completion = job.prompt_tokens or 0, job.completion_tokens or 0
    reasoning, content = None, job.result_text or ""
    if thinking:
        reasoning, content = split_reasoning(content)
    return ChatCompletion(
        id=job.id,
        created=int(job.created_at.timestamp()),
        model=job.model,
        choices=[ChatChoice(
            message=AssistantMessage(content=content, reasoning_content=reasoning),
            finish_reason=job.finish_reason if job.status == JobStatus.SUCCEEDED else "abort",
        )],
        usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                    total_tokens=prompt + completion),
    )


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


async def _stream(
    state: AppState, job: Job, include_usage: bool, thinking: bool
) -> AsyncIterator[bytes]:
    created = int(job.created_at.timestamp())
    splitter = ReasoningSplitter() if thinking else None
    yield _sse(chunk(job.id, created, job.model, {"role": "assistant", "content": ""}))
    finished = False
    usage: dict[str, Any] | None = None
    try:
        # Events that arrived together go out in one write (see api/job_events.py).
        async for batch in job_event_batches(
            state.event_sources, job.id, None,
            keepalive_seconds=state.settings.sse_keepalive_seconds,
            max_seconds=state.settings.sse_max_seconds,
        ):
            if batch is None:
                yield b": keep-alive\n\n"
                continue
            out: list[bytes] = []
            for event in batch:
                if event.type == EventType.USAGE:
                    # OpenAI sends usage last, after the chunk that carries finish_reason.
                    usage = event.data if include_usage else None
                    continue
                out.extend(_sse(payload) for payload in _chunks_for(job, created, event,
                                                                    splitter))
                if event.type.is_terminal and usage is not None:
                    out.append(_sse({**chunk(job.id, created, job.model, {}), "choices": [],
                                     "usage": usage}))
                if event.type.is_terminal:
                    finished = True
            if out:
                yield b"".join(out)
        yield _sse("[DONE]")
    finally:
        if not finished:
            # The client left (we are being cancelled): shield the clean-up.
            with anyio.CancelScope(shield=True):
                await jobs_service.cancel_quietly(state, job.id)


def _chunks_for(
    job: Job, created: int, event: JobEvent, splitter: ReasoningSplitter | None
) -> list[dict[str, Any]]:
    if event.type == EventType.DELTA:
        if splitter is None:
            return [chunk(job.id, created, job.model, {"content": event.data["text"]})]
        return _split_delta(job, created, *splitter.feed(event.data["text"]))
    if event.type in (EventType.DONE, EventType.CANCELLED):
        held = _split_delta(job, created, *splitter.finish()) if splitter else []
        reason = event.data.get("finish_reason") if event.type == EventType.DONE else "abort"
        return [*held, chunk(job.id, created, job.model, {}, reason)]
    if event.type == EventType.ERROR:
        return [stream_error(event.data.get("message"), event.data.get("code"))]
    # RETRY: the job restarted after its worker died; an OpenAI stream cannot take back
    # text, so it is not announced here (the job's own event stream does).
    return []


def _split_delta(job: Job, created: int, reasoning: str, content: str) -> list[dict[str, Any]]:
    delta: dict[str, str] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return [chunk(job.id, created, job.model, delta)] if delta else []
