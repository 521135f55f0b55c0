"""OpenAI-compatible `POST /v1/completions` (legacy completions, for base models).

Each prompt is one job of kind "completion" on the same queue and workers as chat; the
prompt goes to the model as is (no chat template). A list of prompts gives one choice per
prompt and `n` (`index` = prompt position x n + i), streamed interleaved as vLLM does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
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
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
    completion_logprobs,
)
from api.streaming import sse
from storage.events import EventType
from storage.models import Job, JobStatus

router = APIRouter(tags=["openai"])


@router.post(
    "/v1/completions",
    response_model=Completion,
    responses=merge_responses(GENERATION_RESPONSES, idempotent_responses(200)),
)
async def create_completion(
    body: CompletionRequest,
    caller: CurrentCaller,
    state: StateDep,
    response: Response,
    cancel_after: CancelAfter,
    idempotency: IdempotentJobs,
) -> Any:
    """OpenAI completions: `prompt` (a string or up to 16 strings) continued by the model.

    `stream: true` answers `text_completion` chunks ending in `data: [DONE]`
    (`stream_options.include_usage` adds a usage chunk); `echo` returns the prompt first.
    `n` choices per prompt (at most 64 in all); `logprobs` (0-20) returns each token's
    logprob and the most likely alternatives (OpenAI's legacy shape; streamed chunks carry
    their own tokens'). A prompt may carry Qwen-VL `<img>…</img>` tags (URL or base64)
    for image models. `suffix` and `best_of` are refused (400). The jobs' ids are in the
    `X-Ferry-Job-Id` header (comma-separated); a single choice's completion id is its
    job id.
    """
    jobs = idempotency.replayed_jobs  # a retry with the same Idempotency-Key: its jobs
    rate_headers: dict[str, str] = {}
    if jobs is None:
        with_cancel_after(state.settings, body, cancel_after)
        tokens = ratelimit.completion_tokens(body, state.settings)
        sync = not body.stream
        async with ratelimit.admission(
            state, caller, tokens=tokens, sync=sync, body=body
        ) as admitted:
            jobs = admitted.reserve(
                await jobs_service.build_completion_jobs(state, caller.id, body)
            )
        rate_headers = admitted.headers
        await jobs_service.submit(state.intake, jobs)
        await idempotency.record_jobs(jobs)
    completion_id = jobs[0].id if len(jobs) == 1 else f"cmpl-{jobs[0].id}"
    headers = {
        "X-Ferry-Job-Id": ",".join(j.id for j in jobs),
        **idempotency.headers,
        **rate_headers,
    }
    echoes = [p for p in body.prompts for _ in range(body.n)] if body.echo else [""] * len(jobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(
            state, completion_id, jobs, echoes, include_usage, keep=idempotency.keeps_jobs
        )
        return sse.EventStreamResponse(stream, headers=headers)
    response.headers.update(headers)
    finals = await jobs_service.wait_for_all(state, jobs, keep=idempotency.keeps_jobs)
    prompt_tokens = sum(j.prompt_tokens or 0 for j in finals)
    completion_tokens = sum(j.completion_tokens or 0 for j in finals)
    return Completion(
        id=completion_id,
        created=int(jobs[0].created_at.timestamp()),
        model=jobs[0].model,
        choices=[
            CompletionChoice(
                index=i,
                text=echoes[i] + (job.result_text or ""),
                finish_reason=_finish_reason(job),
                logprobs=_logprobs(job, len(echoes[i])),
            )
            for i, job in enumerate(finals)
        ],
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def _finish_reason(job: Job) -> str | None:
    return job.finish_reason if job.status == JobStatus.SUCCEEDED else "abort"


def _logprobs(job: Job, offset: int) -> CompletionLogprobs | None:
    if job.logprobs is None:
        return None
    entries = [e for delta in job.logprobs for e in delta]
    return CompletionLogprobs.model_validate(completion_logprobs(entries, offset))


def _chunk(
    completion_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        ],
    }


async def _stream(
    state: AppState,
    completion_id: str,
    jobs: list[Job],
    echoes: list[str],
    include_usage: bool,
    *,
    keep: bool = False,
) -> AsyncIterator[bytes]:
    created = int(jobs[0].created_at.timestamp())
    model = jobs[0].model
    ended: set[int] = set()
    # Where each choice's next token starts in its text (logprobs' text_offset).
    offsets = [len(echo) for echo in echoes]
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    try:
        for index, echo in enumerate(echoes):
            if echo:
                yield sse.data(_chunk(completion_id, created, model, index, echo))
        async for index, batch in jobs_service.merged_event_batches(state, jobs):
            if batch is None:
                yield sse.KEEPALIVE
                continue
            out: list[dict[str, Any]] = []
            for event in batch:
                if event.type == EventType.DELTA:
                    text, entries = event.data["text"], event.data.get("logprobs")
                    logprobs = None
                    if entries is not None:
                        logprobs = completion_logprobs(entries, offsets[index])
                        offsets[index] += sum(len(e["token"]) for e in entries)
                    out.append(
                        _chunk(completion_id, created, model, index, text, logprobs=logprobs)
                    )
                elif event.type == EventType.USAGE:
                    for name in usage:
                        usage[name] += int(event.data.get(name, 0))
                elif event.type == EventType.DONE:
                    out.append(
                        _chunk(
                            completion_id,
                            created,
                            model,
                            index,
                            "",
                            event.data.get("finish_reason"),
                        )
                    )
                elif event.type == EventType.CANCELLED:
                    out.append(_chunk(completion_id, created, model, index, "", "abort"))
                elif event.type in (EventType.ERROR, EventType.EXPIRED):
                    out.append(stream_error(event.data.get("message"), event.data.get("code")))
                if event.type.is_terminal:
                    ended.add(index)
            if out:
                yield sse.data_events(out)
        if include_usage:
            yield sse.data(
                {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        yield sse.data("[DONE]")
    finally:
        await jobs_service.cancel_unfinished(state, jobs, ended, keep=keep)
