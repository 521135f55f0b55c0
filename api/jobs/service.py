"""Submitting and cancelling jobs: the logic shared by /v1/jobs and /v1/chat/completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anyio
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession

from api.conversations import history
from api.core.errors import (
    Conflict,
    InvalidRequest,
    ModelUnavailable,
    ServiceUnavailable,
    job_failure,
)
from api.core.state import AppState
from api.images import ImageIntake
from api.images.chat import chat_messages
from api.jobs.deadlines import deadline_for
from api.jobs.intake import JobIntake
from api.openai.request_fields import check_fields
from api.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    UnsupportedPart,
)
from api.openai.tools import tool_fields, with_tool_turns
from api.streaming.job_events import job_event_batches, job_events
from storage.channels import CancelChannel
from storage.content import ReasoningMode
from storage.events import FIRST_UNCLAIMED, JobEvent, JobEventStream, terminal_events
from storage.job_metrics import record_job_end
from storage.keys import Lane
from storage.logs import bind_job
from storage.models import Job, JobStatus
from storage.ratelimit import RateLimiter, unused_tokens
from storage.registry import ServedModel
from storage.repositories import jobs as jobs_repo
from storage.stored_request import StoredRequest
from storage.telemetry import current_traceparent, span, trace_id_of, trace_root, traced

log = logging.getLogger(__name__)
# What a 503 for a model whose backlog is full says to wait before retrying.
_OVERLOAD_RETRY_AFTER_SECONDS = 10

# Jobs one completions request may start (its prompts x n).
MAX_CHOICES = 64


def sampling_request(
    body: SamplingFields, model: ServedModel, default_max_tokens: int | None = None
) -> dict[str, Any]:
    """The engine-facing fields of a request (`StoredRequest` fields), checked against the
    model. Without max_tokens (and no operator default) none is stored: the engine gives
    the completion the rest of the context, as vLLM and OpenAI do."""
    check_fields(body, model)
    max_tokens = body.requested_max_tokens
    # 0: a declared model no worker has announced yet; its engine checks the length.
    known = model.max_model_len or None
    if max_tokens is None and default_max_tokens is not None:
        max_tokens = default_max_tokens if known is None else min(default_max_tokens, known - 1)
    if max_tokens is not None and known is not None and max_tokens >= known:
        raise InvalidRequest(
            f"max_tokens={max_tokens} does not fit the model's context of "
            f"{model.max_model_len} tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    fields = body.model_dump(
        include={
            "temperature",
            "top_p",
            "top_k",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "min_p",
            "repetition_penalty",
            "min_tokens",
        },
        exclude_none=True,
    )
    if body.ignore_eos:
        fields["ignore_eos"] = True
    if body.logprobs_wanted is not None:
        fields["logprobs"] = body.logprobs_wanted
    structured = body.structured_output
    if structured is not None:
        if not model.supports_structured_output:
            raise InvalidRequest(
                f"Model `{model.name}` runs on the `{model.engine}` engine, which cannot "
                "constrain output to JSON; response_format needs a vLLM worker.",
                param="response_format",
                code="unsupported_response_format",
            )
        fields["structured_output"] = structured
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    return {"model": model.name, **fields}


async def admit(state: AppState, model: ServedModel, *, sync: bool) -> ServedModel:
    """New interactive work for `model`: 503 `model_overloaded` when its backlog is at
    FERRY_MAX_QUEUED_PER_MODEL; for a synchronous request (its answer is awaited), the
    model once a worker serves it live (`ModelCatalog.with_worker`: waits up to
    FERRY_SYNC_WAIT_SECONDS, then 503 `model_unavailable`). Checked before anything is
    stored."""
    most = state.settings.max_queued_per_model
    if most:
        async with state.db.read() as session:
            backlog = await jobs_repo.count_held_for_model(session, model.name, most)
        if backlog >= most:
            raise ModelUnavailable(
                f"The model `{model.name}` has {most} jobs waiting already; retry later.",
                retry_after=_OVERLOAD_RETRY_AFTER_SECONDS,
                code="model_overloaded",
            )
    if sync:
        return await state.catalog.with_worker(model, state.settings.sync_wait_seconds)
    return model


def _with_context(
    request: StoredRequest, body: SamplingFields, model: ServedModel, default: int | None
) -> StoredRequest:
    """A request built before its model's context was known, checked against it (400 if
    its max_tokens does not fit) and with the default max_tokens that context gives."""
    fields = sampling_request(body, model, default)
    return request.model_copy(update={"max_tokens": fields.get("max_tokens")})


async def build_chat_jobs(
    state: AppState, owner_id: str, body: ChatCompletionRequest, *, sync: bool = True
) -> list[Job]:
    """`/v1/chat/completions`: one job per choice (`n`), the same request each (with a
    seed, choice i samples with seed + i, so choices differ and each is reproducible)."""
    if body.n > 1 and body.conversation_id is not None:
        raise InvalidRequest(
            "n > 1 cannot continue a conversation (which reply would be its next turn?).", param="n"
        )
    job = await _chat_job(state, owner_id, body, Lane.INTERACTIVE, sync=sync)
    request = StoredRequest.load(job.request)
    return [job] + [
        _queued_job(
            owner_id,
            body,
            job.model,
            "chat",
            Lane.INTERACTIVE,
            _nth(request, i),
            deadline_at=job.deadline_at,
        )
        for i in range(1, body.n)
    ]


def _nth(request: StoredRequest, i: int) -> StoredRequest:
    """The request of choice i (of n)."""
    if request.seed is None:
        return request
    return request.model_copy(update={"seed": request.seed + i})


async def build_chat_job(
    state: AppState,
    owner_id: str,
    body: ChatCompletionRequest,
    *,
    lane: Lane = Lane.INTERACTIVE,
    sync: bool = False,
    admitted: bool = False,
) -> Job:
    """One job: `/v1/jobs`, EAS and batch lines (one answer each: n is 1). `admitted`: the
    caller has run `admit` for its model already."""
    if body.n != 1:
        raise InvalidRequest(
            "A job has one choice: n must be 1 here (n > 1 is for "
            "/v1/chat/completions and /v1/completions).",
            param="n",
        )
    return await _chat_job(state, owner_id, body, lane, sync=sync, admitted=admitted)


@traced("ferry.validate")
async def _chat_job(
    state: AppState,
    owner_id: str,
    body: ChatCompletionRequest,
    lane: Lane,
    *,
    sync: bool,
    admitted: bool = False,
) -> Job:
    deadline_at = deadline_for(state.settings, body, lane)
    model = await state.catalog.resolve(body.model, body.carries_images)
    refuse_unsupported_parts(body, model)
    fields = sampling_request(body, model, state.settings.default_max_tokens)
    images = ImageIntake.for_state(state, owner_id)
    messages = with_tool_turns(body, await chat_messages(images, body, model))
    template_kwargs = dict(body.chat_template_kwargs or {})
    thinking = body.enable_thinking
    if thinking is not None:
        # The template decides how thinking starts (Qwen3-style templates read this flag),
        # whichever way (vLLM's or FastDeploy's) it was asked for.
        template_kwargs["enable_thinking"] = thinking
    request = StoredRequest(
        **fields,
        **tool_fields(body),
        messages=messages,
        reasoning=reasoning_mode_for(model, thinking),
        chat_template_kwargs=template_kwargs or None,
    )
    if body.conversation_id is not None:
        await history.prepend_history(state.db, owner_id, body.conversation_id, request)
    # After the request's own checks (a bad request is a 400 at once, not after a wait),
    # before anything is stored.
    if lane == Lane.INTERACTIVE and not admitted:
        announced = await admit(state, model, sync=sync)
        if announced is not model:  # a declared model, announced by its first worker
            model = announced
            refuse_unsupported_parts(body, model)
            request = _with_context(request, body, model, state.settings.default_max_tokens)
    # Last, once every check has passed: a refused request stores no image.
    await images.store()
    return _queued_job(
        owner_id,
        body,
        model.name,
        "chat",
        lane,
        request,
        conversation_id=body.conversation_id,
        deadline_at=deadline_at,
    )


def reasoning_mode_for(model: ServedModel, thinking: bool | None) -> ReasoningMode | None:
    """How the reply's `<think>` text is split into `reasoning_content`: by default for a
    model with a reasoning parser (its reply may start inside the reasoning, the template
    having opened `<think>`), unless thinking is turned off; else only when asked for."""
    if model.reasoning_parser is not None and thinking is not False:
        return "parser"
    return "tagged" if thinking else None


_PART_NAMES = {"video_url": "video", "input_audio": "audio", "file": "files"}


def refuse_unsupported_parts(body: ChatCompletionRequest, model: ServedModel) -> None:
    """Video, audio and file parts: a 400 naming the part (no Ferry model takes them)."""
    for index, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for number, part in enumerate(message.content):
            if isinstance(part, UnsupportedPart):
                takes = "text and images" if model.supports_images else "text only"
                raise InvalidRequest(
                    f"The model `{model.name}` does not take {_PART_NAMES[part.type]} "
                    f"(`{part.type}` content parts); it takes {takes}.",
                    param=f"messages.{index}.content.{number}",
                    code="unsupported_content",
                )


def _queued_job(
    owner_id: str,
    body: SamplingFields,
    model: str,
    kind: str,
    lane: Lane,
    request: StoredRequest,
    deadline_at: datetime | None = None,
    conversation_id: str | None = None,
) -> Job:
    return Job(
        id=jobs_repo.new_job_id(),
        owner_id=owner_id,
        model=model,
        kind=kind,
        lane=lane,
        status=JobStatus.QUEUED,
        priority=body.priority,
        request=request.dump(),
        metadata_=body.metadata,
        attempts=0,
        conversation_id=conversation_id,
        deadline_at=deadline_at,
    )


@traced("ferry.validate")
async def build_completion_jobs(
    state: AppState,
    owner_id: str,
    body: CompletionRequest,
    *,
    lane: Lane = Lane.INTERACTIVE,
    sync: bool = True,
) -> list[Job]:
    """One job per prompt and choice (kind "completion": the prompt goes to the model as
    is), prompt by prompt: choice index = prompt index x n + i, as in vLLM."""
    for name in ("suffix", "best_of"):
        if getattr(body, name) is not None:
            raise InvalidRequest(
                f"`{name}` is not supported by this server.",
                param=name,
                code="unsupported_parameter",
            )
    if len(body.prompts) * body.n > MAX_CHOICES:
        raise InvalidRequest(f"At most {MAX_CHOICES} choices per request (prompts x n).", param="n")
    if body.n > 1 and lane == Lane.BULK:
        raise InvalidRequest("A batch line has one choice: n must be 1.", param="n")
    deadline_at = deadline_for(state.settings, body, lane)
    wants_images = any("<img>" in prompt for prompt in body.prompts)
    model = await state.catalog.resolve(body.model, wants_images)
    base = sampling_request(body, model, state.settings.default_max_tokens)
    # One intake for all prompts: the request's image limits span them, and nothing is
    # stored unless every prompt passed.
    images = ImageIntake.for_state(state, owner_id)
    if body.echo:
        base["echo"] = True  # the answer starts with the prompt (batch output reads it)
    requests = [
        StoredRequest(**base, prompt=await completion_prompt(images, model, prompt))
        for prompt in body.prompts
    ]
    # After the request's own checks (a bad request is a 400 at once, not after a wait),
    # before anything is stored.
    if lane == Lane.INTERACTIVE:
        announced = await admit(state, model, sync=sync)
        if announced is not model:  # a declared model, announced by its first worker
            model = announced
            limit = state.settings.default_max_tokens
            requests = [_with_context(r, body, model, limit) for r in requests]
    await images.store()
    return [
        _queued_job(
            owner_id,
            body,
            model.name,
            "completion",
            lane,
            _nth(request, i),
            deadline_at=deadline_at,
        )
        for request in requests
        for i in range(body.n)
    ]


async def completion_prompt(
    images: ImageIntake, model: ServedModel, prompt: str
) -> str | list[dict[str, Any]]:
    """A completion prompt as stored: plain text, or text and image parts when it carries
    Qwen-VL `<img>…</img>` tags (checked into `images`; stored by the caller).
    For a model that takes no images, tags are plain text."""
    if not model.supports_images or "<img>" not in prompt:
        return prompt
    return await images.add_text(prompt, param="prompt")


async def submit(intake: JobIntake, jobs: list[Job]) -> None:
    """Commit the rows (grouped with concurrent submits), then queue them: an accepted
    job is always in SQL before its message is sent. With tracing on, the jobs carry
    the request's trace (`traceparent`) for their workers to join."""
    with trace_root("ferry.submit"):
        traceparent = current_traceparent()
        # The rest of the request's log lines name its jobs (and trace).
        bind_job(",".join(j.id for j in jobs), trace_id_of(traceparent))
        if traceparent is None:
            await intake.accept(jobs)
            return
        for job in jobs:
            job.traceparent = traceparent
        with span("ferry.sql_commit", **{"ferry.jobs": len(jobs)}):
            await intake.accept(jobs)


async def cancel(
    events: JobEventStream,
    cancels: CancelChannel,
    session: AsyncSession,
    job: Job,
    limiter: RateLimiter | None = None,
    metrics: Redis | None = None,
) -> Job:
    """Queued: it will never run (its reserved tokens go back to its key at once).
    Running: its worker aborts it in the engine (and settles its tokens). The end is
    counted here, in `metrics` (the worker counts a running job's tokens)."""
    previous = await jobs_repo.cancel_job(session, job.id)
    if previous is None:
        raise Conflict(
            f"Job `{job.id}` has already finished ({job.status}).",
            param="job_id",
            code="job_finished",
        )
    await session.commit()
    if metrics is not None:
        try:
            await record_job_end(metrics, job.model, JobStatus.CANCELLED.value)
        except Exception:
            log.warning("could not count the cancel of job %s", job.id, exc_info=True)
    if previous == JobStatus.QUEUED:
        # No worker will ever touch it: the API ends its stream itself.
        [(kind, data)] = terminal_events(JobStatus.CANCELLED, job)
        await events.publish([(job.id, JobEvent(FIRST_UNCLAIMED, kind, data))])
        if limiter is not None:
            await limiter.give_back(job.owner_id, unused_tokens(job.reserved_tokens, 0, 0))
    else:
        await cancels.publish(job.id)
    refreshed = await jobs_repo.get_job(session, job.id)
    assert refreshed is not None
    return refreshed


async def delete(events: JobEventStream, session: AsyncSession, job: Job) -> None:
    """Delete a finished job and its event stream. An unfinished job must be cancelled
    first; a batch line goes with its batch."""
    if job.batch_id is not None:
        raise Conflict(
            f"Job `{job.id}` is a line of batch `{job.batch_id}`: it is deleted with its batch.",
            param="job_id",
            code="job_in_batch",
        )
    if not await jobs_repo.delete_finished_job(session, job.id):
        raise Conflict(
            f"Job `{job.id}` has not finished: cancel it first.",
            param="job_id",
            code="job_not_finished",
        )
    await session.commit()
    await events.forget(job.id)


async def wait_for_end(state: AppState, job_id: str) -> Job:
    """Wait (on the job's events, not by polling SQL) until the job ends; its final row.

    A failed or expired job raises its error (`api.core.errors.job_failure`: 400, 500 or
    504); one that outlives
    `sync_timeout_seconds` raises `ServiceUnavailable` (the job itself goes on)."""
    async for event in job_events(
        state.event_sources,
        job_id,
        None,
        keepalive_seconds=state.settings.sse_keepalive_seconds,
        max_seconds=state.settings.sync_timeout_seconds,
    ):
        if event is not None and event.type.is_terminal:
            break
    else:
        raise ServiceUnavailable(f"Job `{job_id}` did not finish in time; poll /v1/jobs/{job_id}.")
    async with state.db.read() as read:
        final = await jobs_repo.get_job(read, job_id)
    assert final is not None
    if final.status in (JobStatus.FAILED, JobStatus.EXPIRED):
        # The request's fault (the engine refused it) is a 400; a deadline that passed
        # before the job ran a 504; anything else is ours.
        raise job_failure(final.error, final.error_code)
    return final


async def wait_for_all(state: AppState, jobs: list[Job], *, keep: bool = False) -> list[Job]:
    """`wait_for_end` for every job (a request's choices); if one fails or the client
    goes away, the others are cancelled (unless `keep`: a request with an
    Idempotency-Key, whose retry waits for the same jobs)."""
    try:
        return list(await asyncio.gather(*(wait_for_end(state, j.id) for j in jobs)))
    except BaseException:
        if keep:
            raise
        with anyio.CancelScope(shield=True):
            for job in jobs:
                await cancel_quietly(state, job.id)
        raise


async def merged_event_batches(
    state: AppState, jobs: list[Job]
) -> AsyncIterator[tuple[int, list[JobEvent] | None]]:
    """The event batches of a request's jobs (its choices), interleaved as they come,
    each tagged with its job's index; (index, None) is a keep-alive."""

    def batches(job: Job) -> AsyncIterator[list[JobEvent] | None]:
        return job_event_batches(
            state.event_sources,
            job.id,
            None,
            keepalive_seconds=state.settings.sse_keepalive_seconds,
            max_seconds=state.settings.sse_max_seconds,
            traceparent=job.traceparent,
        )

    if len(jobs) == 1:  # the common case: no tasks, no queue
        async for batch in batches(jobs[0]):
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[JobEvent] | None] | int] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async for batch in batches(job):
                await queue.put((index, batch))
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


async def cancel_unfinished(
    state: AppState, jobs: list[Job], ended: set[int], *, keep: bool = False
) -> None:
    """A stream's clean-up: cancel its jobs (by index) that have not ended, shielded from
    the cancellation of a client that left (unless `keep`, as in `wait_for_all`)."""
    if len(ended) < len(jobs) and not keep:
        with anyio.CancelScope(shield=True):
            for index, job in enumerate(jobs):
                if index not in ended:
                    await cancel_quietly(state, job.id)


async def cancel_quietly(state: AppState, job_id: str) -> None:
    """Cancel a job whose client went away (best effort; never raises)."""
    with contextlib.suppress(Exception):
        async with state.db.transaction() as session:
            job = await jobs_repo.get_job(session, job_id)
            if job is not None and not job.status.is_terminal:
                await cancel(state.events, state.cancels, session, job, state.limiter, state.redis)
                log.info("client left: cancelled job %s", job_id)
