"""OpenAI-compatible `POST /v1/completions` (legacy completions, for base models).

Each prompt is one job of kind "completion" on the same queue and workers as chat; the
prompt goes to the model as is (no chat template). A list of prompts gives one choice per
prompt (`index` = the prompt's position), streamed interleaved as vLLM does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api import jobs_service
from api.deps import CurrentKey, StateDep
from api.errors import stream_error
from api.job_events import job_events
from api.schemas.openai import Completion, CompletionChoice, CompletionRequest, Usage
from api.state import AppState
from storage.events import EventType, JobEvent
from storage.models import Job, JobStatus

router = APIRouter(tags=["openai"])


@router.post("/v1/completions", response_model=Completion)
async def create_completion(body: CompletionRequest, key: CurrentKey, state: StateDep) -> Any:
    """OpenAI completions: `prompt` (a string or up to 16 strings) continued by the model.

    `stream: true` answers `text_completion` chunks ending in `data: [DONE]`
    (`stream_options.include_usage` adds a usage chunk); `echo` returns the prompt first.
    A prompt may carry Qwen-VL `<img>…</img>` tags (URL or base64) for image models.
    `suffix`, `logprobs` and `best_of` are refused (400). The jobs' ids are in the
    `X-Ferry-Job-Id` header (comma-separated); a single prompt's completion id is its
    job id.
    """
    jobs = await jobs_service.build_completion_jobs(state, key, body)
    await jobs_service.submit(state, jobs)
    completion_id = jobs[0].id if len(jobs) == 1 else f"cmpl-{jobs[0].id}"
    headers = {"X-Ferry-Job-Id": ",".join(j.id for j in jobs)}
    echoes = body.prompts if body.echo else [""] * len(jobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        stream = _stream(state, completion_id, jobs, echoes, include_usage)
        return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
    try:
        finals = await asyncio.gather(*(jobs_service.wait_for_end(state, j.id) for j in jobs))
    except BaseException:
        with anyio.CancelScope(shield=True):
            for job in jobs:
                await jobs_service.cancel_quietly(state, job.id)
        raise
    prompt_tokens = sum(j.prompt_tokens or 0 for j in finals)
    completion_tokens = sum(j.completion_tokens or 0 for j in finals)
    return Completion(
        id=completion_id,
        created=int(jobs[0].created_at.timestamp()),
        model=body.model,
        choices=[
            CompletionChoice(index=i, text=echoes[i] + (job.result_text or ""),
                             finish_reason=_finish_reason(job))
            for i, job in enumerate(finals)
        ],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    )


def _finish_reason(job: Job) -> str | None:
    return job.finish_reason if job.status == JobStatus.SUCCEEDED else "abort"


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _chunk(
    completion_id: str, created: int, model: str, index: int, text: str,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text, "logprobs": None,
                     "finish_reason": finish_reason}],
    }


async def _merged_events(
    state: AppState, jobs: list[Job]
) -> AsyncIterator[tuple[int, JobEvent | None]]:
    """The events of several jobs, interleaved as they come, tagged with the job's index."""
    if len(jobs) == 1:  # the common case: no tasks, no queue
        async for event in job_events(
            state.event_sources, jobs[0].id, None,
            keepalive_seconds=state.settings.sse_keepalive_seconds,
            max_seconds=state.settings.sse_max_seconds,
        ):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, JobEvent | None] | int] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async for event in job_events(
                state.event_sources, job.id, None,
                keepalive_seconds=state.settings.sse_keepalive_seconds,
                max_seconds=state.settings.sse_max_seconds,
            ):
                await queue.put((index, event))
        finally:
            await queue.put(index)  # this job's stream is over

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if isinstance(item, int):
                remaining -= 1
                continue
            yield item
        for task in tasks:
            task.result()  # surface a pump's error
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _stream(
    state: AppState, completion_id: str, jobs: list[Job], echoes: list[str],
    include_usage: bool,
) -> AsyncIterator[bytes]:
    created = int(jobs[0].created_at.timestamp())
    model = jobs[0].model
    ended: set[int] = set()
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    try:
        for index, echo in enumerate(echoes):
            if echo:
                yield _sse(_chunk(completion_id, created, model, index, echo))
        async for index, event in _merged_events(state, jobs):
            if event is None:
                yield b": keep-alive\n\n"
                continue
            if event.type == EventType.DELTA:
                yield _sse(_chunk(completion_id, created, model, index, event.data["text"]))
            elif event.type == EventType.USAGE:
                for name in usage:
                    usage[name] += int(event.data.get(name, 0))
            elif event.type == EventType.DONE:
                yield _sse(_chunk(completion_id, created, model, index, "",
                                  event.data.get("finish_reason")))
            elif event.type == EventType.CANCELLED:
                yield _sse(_chunk(completion_id, created, model, index, "", "abort"))
            elif event.type == EventType.ERROR:
                yield _sse(stream_error(event.data.get("message"), event.data.get("code")))
            if event.type.is_terminal:
                ended.add(index)
        if include_usage:
            yield _sse({"id": completion_id, "object": "text_completion", "created": created,
                        "model": model, "choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        if len(ended) < len(jobs):
            # The client left (we are being cancelled): shield the clean-up.
            with anyio.CancelScope(shield=True):
                for index, job in enumerate(jobs):
                    if index not in ended:
                        await jobs_service.cancel_quietly(state, job.id)
