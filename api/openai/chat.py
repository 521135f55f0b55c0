"""OpenAI-compatible `POST /v1/chat/completions`: a job underneath, waited on or streamed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Response

from api.core import ratelimit
from api.core.deps import CurrentCaller, StateDep
from api.core.errors import merge_responses, stream_error
from api.core.idempotency import IdempotentJobs
from api.core.idempotency import responses as idempotent_responses
from api.core.state import AppState
from api.jobs import service as jobs_service
from api.jobs.deadlines import CancelAfter, with_cancel_after
from api.openai.schemas import (
    GENERATION_RESPONSES,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatLogprobs,
    Usage,
    chat_logprobs,
    chunk,
)
from api.openai.tools import reply_message
from api.streaming import sse
from storage.content import ReasoningSplitter
from storage.events import EventType, JobEvent
from storage.models import Job, JobStatus
from storage.stored_request import StoredRequest

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=merge_responses(GENERATION_RESPONSES, idempotent_responses(200)),
)
async def create_chat_completion(
    body: ChatCompletionRequest,
    caller: CurrentCaller,
    state: StateDep,
    response: Response,
    cancel_after: CancelAfter,
    idempotency: IdempotentJobs,
) -> Any:
    """OpenAI chat completions, through the same queue and workers as `/v1/jobs`.

    With `stream: true` the answer is `chat.completion.chunk` events ending in
    `data: [DONE]`; `stream_options.include_usage` adds a final usage chunk. The
    completion id is the job id (`GET /v1/jobs/{id}` works on it); with `n` > 1 each
    choice is its own job (ids in `X-Ferry-Job-Id`, comma-separated; the completion id is
    `chatcmpl-` + the first's), streamed interleaved. A streaming client that disconnects
    cancels its jobs, as in vLLM (unless it sent an `Idempotency-Key`: its retry gets them).

    `model` may be omitted (or an alias such as `null`): the default model, or one that
    takes images for a request that carries them.

    Thinking: `enable_thinking` (true or false, in `chat_template_kwargs` or FastDeploy's
    `metadata`) reaches the chat template. For a model served with a reasoning parser the
    reply is split by default into `reasoning_content` (up to `</think>`, also when the
    template opened `<think>` in the prompt) and `content`, streamed or not; for others,
    when thinking is asked for, a reply that opens with `<think>` is split.
    `response_format` (`json_object`, `json_schema`) constrains the output through vLLM's
    structured outputs; a model served by an engine that cannot is a 400. `logprobs` /
    `top_logprobs` return each token's logprob (each streamed chunk carries its own).
    Tools: for a model whose worker runs a tool-call parser (`--tool-call-parser`, vLLM's
    parsers by name), `tools` reach the chat template, and the reply is parsed with that
    parser when it ends: its calls are `message.tool_calls` (finish_reason `tool_calls`),
    `content` the rest. Streamed, such a reply's content is held back until the end, then
    sent with the tool calls in one chunk before the finish chunk (vLLM streams the calls
    incrementally; one chunk per reply is equally OpenAI's shape). `tool_choice` `auto`,
    `none`, `required` or a named function; the last two are forced through structured
    outputs as vLLM forces them (vLLM workers only). Without a parser `tools` is a 400.
    A field Ferry cannot honour is refused (400 naming it), never ignored.
    """
    jobs = idempotency.replayed_jobs  # a retry with the same Idempotency-Key: its jobs
    rate_headers: dict[str, str] = {}
    if jobs is None:
        with_cancel_after(state.settings, body, cancel_after)
        tokens = ratelimit.chat_tokens(body, state.settings)
        sync = not body.stream
        async with ratelimit.admission(
            state, caller, tokens=tokens, sync=sync, body=body
        ) as admitted:
            jobs = admitted.reserve(await jobs_service.build_chat_jobs(state, caller.id, body))
        rate_headers = admitted.headers
        await jobs_service.submit(state.intake, jobs)
        await idempotency.record_jobs(jobs)
    completion_id = jobs[0].id if len(jobs) == 1 else f"chatcmpl-{jobs[0].id}"
    headers = {
        "X-Ferry-Job-Id": ",".join(j.id for j in jobs),
        **idempotency.headers,
        **rate_headers,
    }
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStreamResponse(
            _stream(
                state,
                completion_id,
                jobs,
                include_usage,
                StoredRequest.load(jobs[0].request),
                keep=idempotency.keeps_jobs,
            ),
            headers=headers,
        )
    response.headers.update(headers)
    finals = await jobs_service.wait_for_all(state, jobs, keep=idempotency.keeps_jobs)
    return _completion(completion_id, finals)


def _completion(completion_id: str, jobs: list[Job]) -> ChatCompletion:
    prompt = sum(j.prompt_tokens or 0 for j in jobs)
    completion = sum(j.completion_tokens or 0 for j in jobs)
    return ChatCompletion(
        id=completion_id,
        created=int(jobs[0].created_at.timestamp()),
        model=jobs[0].model,
        choices=[_choice(i, job) for i, job in enumerate(jobs)],
        usage=Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ),
    )


def _choice(index: int, job: Job) -> ChatChoice:
    logprobs = None
    if job.logprobs is not None:
        logprobs = ChatLogprobs.model_validate(
            chat_logprobs([e for entries in job.logprobs for e in entries])
        )
    return ChatChoice(
        index=index,
        message=reply_message(job),
        finish_reason=job.finish_reason if job.status == JobStatus.SUCCEEDED else "abort",
        logprobs=logprobs,
    )


@dataclass(frozen=True, slots=True)
class _Choice:
    """What one streamed choice's chunks are built from."""

    completion_id: str
    created: int
    model: str
    index: int
    splitter: ReasoningSplitter | None
    # A request with tools: its content, held back until the end (None: streamed).
    held: list[str] | None = None


async def _stream(
    state: AppState,
    completion_id: str,
    jobs: list[Job],
    include_usage: bool,
    request: StoredRequest,
    *,
    keep: bool = False,
) -> AsyncIterator[bytes]:
    created = int(jobs[0].created_at.timestamp())
    mode, holds = request.reasoning, request.parses_tool_calls
    choices = [
        _Choice(
            completion_id,
            created,
            jobs[0].model,
            i,
            ReasoningSplitter(mode) if mode else None,
            [] if holds else None,
        )
        for i in range(len(jobs))
    ]
    yield sse.data_events(
        chunk(completion_id, created, c.model, {"role": "assistant", "content": ""}, index=c.index)
        for c in choices
    )
    ended: set[int] = set()
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    try:
        # Events that arrived together go out in one write (see api/streaming/job_events.py).
        async for index, batch in jobs_service.merged_event_batches(state, jobs):
            if batch is None:
                yield sse.KEEPALIVE
                continue
            out: list[dict[str, Any]] = []
            for event in batch:
                if event.type == EventType.USAGE:
                    # OpenAI sends usage last, after the chunks that carry finish_reason.
                    for name in usage:
                        usage[name] += int(event.data.get(name, 0))
                    continue
                out += _chunks_for(choices[index], event)
                if event.type.is_terminal:
                    ended.add(index)
            if out:
                yield sse.data_events(out)
        if include_usage:
            yield sse.data(
                {**chunk(completion_id, created, jobs[0].model, {}), "choices": [], "usage": usage}
            )
        yield sse.data("[DONE]")
    finally:
        await jobs_service.cancel_unfinished(state, jobs, ended, keep=keep)


def _chunks_for(choice: _Choice, event: JobEvent) -> list[dict[str, Any]]:
    if event.type == EventType.DELTA:
        entries = event.data.get("logprobs")
        logprobs = chat_logprobs(entries) if entries is not None else None
        if choice.splitter is None and choice.held is None:
            return [_chunk(choice, {"content": event.data["text"]}, logprobs=logprobs)]
        if choice.splitter is None:
            return _split_delta(choice, "", event.data["text"], logprobs)
        return _split_delta(choice, *choice.splitter.feed(event.data["text"]), logprobs)
    if event.type in (EventType.DONE, EventType.CANCELLED):
        held = _split_delta(choice, *choice.splitter.finish()) if choice.splitter else []
        reason = event.data.get("finish_reason") if event.type == EventType.DONE else "abort"
        return [*held, *_held_content(choice, event), _chunk(choice, {}, reason)]
    if event.type in (EventType.ERROR, EventType.EXPIRED):
        return [stream_error(event.data.get("message"), event.data.get("code"))]
    # RETRY: the job restarted after its worker died; an OpenAI stream cannot take back
    # text, so it is not announced here (the job's own event stream does). Text held
    # back was never sent: the new attempt's replaces it.
    if event.type == EventType.RETRY and choice.held is not None:
        choice.held.clear()
    return []


def _held_content(choice: _Choice, event: JobEvent) -> list[dict[str, Any]]:
    """At the end of a reply to a request with tools: its tool calls (with the content the
    parser left) in one chunk, or the content held back when it calls none. vLLM streams
    tool calls incrementally, a piece of the arguments per chunk; one chunk with each call
    whole is the same stream in OpenAI's shape, and a client that concatenates the pieces
    by `index` gets the same calls."""
    if choice.held is None:
        return []
    text, choice.held[:] = "".join(choice.held), []
    calls = event.data.get("tool_calls") if event.type == EventType.DONE else None
    if calls is None:
        return [_chunk(choice, {"content": text})] if text else []
    delta: dict[str, Any] = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
    if event.data.get("content"):
        delta = {"content": event.data["content"], **delta}
    return [_chunk(choice, delta)]


def _chunk(
    choice: _Choice,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return chunk(
        choice.completion_id,
        choice.created,
        choice.model,
        delta,
        finish_reason,
        index=choice.index,
        logprobs=logprobs,
    )


def _split_delta(
    choice: _Choice, reasoning: str, content: str, logprobs: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    delta: dict[str, str] = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content and choice.held is not None:
        choice.held.append(content)  # a request with tools: content waits for the end
    elif content:
        delta["content"] = content
    if not delta and logprobs is None:
        return []
    # Text held back (a possible `<think>` tag, a reply that may call tools) still sends
    # its tokens' logprobs now.
    return [_chunk(choice, delta, logprobs=logprobs)]
