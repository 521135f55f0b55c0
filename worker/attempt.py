"""One attempt at one job the worker has claimed: stream the engine's deltas out, record the end."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import telemetry
from storage.content import ImageRef, image_refs
from storage.events import (
    FIRST_UNCLAIMED,
    INVALID_REQUEST,
    SERVER_ERROR,
    EventType,
    JobEvent,
    terminal_events,
)
from storage.job_metrics import record_job_end
from storage.keys import Lane
from storage.models import Job, JobStatus, utcnow
from storage.objects import ObjectNotFound, ObjectStore, image_key
from storage.ratelimit import RateLimiter, unused_tokens
from storage.repositories import jobs as jobs_repo
from storage.stored_request import StoredRequest
from worker.admission import EngineAdmission
from worker.engines.base import (
    Engine,
    GenerationRequest,
    SamplingOptions,
    TokenLogprob,
)
from worker.errors import EngineBroken, EngineRequestError, ImageUnavailable, WorkerStopping
from worker.group_commit import GroupCommit
from worker.job_state import JobAttempt
from worker.publisher import EventPublisher
from worker.tool_calls import ToolCallParser

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)
_T = TypeVar("_T")


async def generation_request(
    job: Job, body: StoredRequest, request_id: str, bulk_priority: int, objects: ObjectStore
) -> GenerationRequest:
    """Map the job's stored OpenAI-style request (`body`, read from `job.request`) onto
    the engine's request, with its images read from the object store and decoded (raises
    ImageUnavailable)."""
    request = _mapped_request(job, body, request_id, bulk_priority)
    contents = [m.get("content") for m in body.messages or []] + [body.prompt]
    refs = [ref for content in contents for ref in image_refs(content)]
    if not refs:
        return request
    return dataclasses.replace(request, images=await load_images(objects, refs))


async def load_images(objects: ObjectStore, refs: list[ImageRef]) -> tuple[Image, ...]:
    """Fetch and decode every image concurrently (boto3 and Pillow block: threads), each
    distinct object once; RGB, in the order of `refs`."""
    distinct = list(dict.fromkeys(ref["sha256"] for ref in refs))
    images = await asyncio.gather(
        *(asyncio.to_thread(_read_image, objects, sha) for sha in distinct)
    )
    by_sha = dict(zip(distinct, images, strict=True))
    return tuple(by_sha[ref["sha256"]] for ref in refs)


def _read_image(objects: ObjectStore, sha256: str) -> Image:
    from PIL import Image, UnidentifiedImageError

    try:
        data = objects.get_bytes(image_key(sha256))
    except ObjectNotFound:
        raise ImageUnavailable(
            f"image {sha256} is missing from the object store; send it again"
        ) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageUnavailable(f"image {sha256} cannot be decoded: {exc}") from exc


def _placeholders(content: Any) -> Any:
    """Stored content with each image reference replaced by a bare {"type": "image"}."""
    if not isinstance(content, list):
        return content
    return [{"type": "image"} if part.get("type") == "image" else part for part in content]


def _mapped_request(
    job: Job, body: StoredRequest, request_id: str, bulk_priority: int
) -> GenerationRequest:
    stop = body.stop or ()
    sampling = SamplingOptions(
        # Absent: the rest of the context (the engine knows the prompt's length).
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        min_p=body.min_p,
        repetition_penalty=body.repetition_penalty,
        min_tokens=body.min_tokens or 0,
        # JSON keys are strings: OpenAI's token id -> bias.
        logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
        logprobs=body.logprobs,
        ignore_eos=body.ignore_eos,
        structured_output=body.structured_output,
    )
    # Engine priority: interactive first; within a lane the job's own priority orders it.
    priority = job.priority + (bulk_priority if job.lane == Lane.BULK else 0)
    # Bulk (batch) lines are read from SQL when they end: their text need not stream.
    streamed = job.lane != Lane.BULK
    if job.kind == "completion":
        return GenerationRequest(
            request_id,
            prompt=_placeholders(_given(body.prompt)),
            sampling=sampling,
            priority=priority,
            stream=streamed,
        )
    messages = [{**m, "content": _placeholders(m.get("content"))} for m in _given(body.messages)]
    return GenerationRequest(
        request_id,
        messages=messages,
        sampling=sampling,
        priority=priority,
        stream=streamed,
        chat_template_kwargs=body.chat_template_kwargs,
        tools=body.tools,
    )


def _given(value: _T | None) -> _T:
    """A chat job's messages, a completion job's prompt: a row without them is broken."""
    if value is None:
        raise ValueError("the stored request has no prompt")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Failure:
    """Why a job failed, and whose fault it was (storage.events: INVALID_REQUEST, the
    request's, answered 400; SERVER_ERROR, Ferry's, answered 5xx)."""

    message: str
    code: str


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptContext:
    """What every attempt on this worker shares (the runner builds it once)."""

    worker_id: str
    engine: Engine
    sessions: async_sessionmaker[AsyncSession]
    publisher: EventPublisher
    claims: GroupCommit[str, Job | None]
    outcomes: GroupCommit[tuple[str, jobs_repo.JobOutcome], JobStatus | None]
    bulk_priority: int
    max_attempts: int
    in_flight: dict[str, JobAttempt]
    admission: EngineAdmission
    objects: ObjectStore
    # LoRA adapters this worker serves (by model name): their jobs run with the adapter.
    adapters: frozenset[str] = frozenset()
    # `--tool-call-parser`: replies to requests with tools are parsed with it.
    tool_parser: ToolCallParser | None = None
    # Settlement: a job's unused reserved tokens go back to its key's tokens_per_minute.
    limiter: RateLimiter | None = None
    # Where job ends are counted (storage/job_metrics.py); None: not counted.
    metrics: Redis | None = None


async def run_claimed(ctx: AttemptContext, job: Job) -> str:
    """Run a job this worker has just claimed (`ctx.claims`); returns what happened, for
    the task's log."""
    job_id = job.id
    state = JobAttempt(job_id, job.attempts, f"{job_id}:{job.attempts}", started_at=job.started_at)
    state.owner_id, state.reserved_tokens = job.owner_id, job.reserved_tokens
    state.model, state.created_at = job.model, job.created_at
    body = _stored_request(job)
    if isinstance(body, StoredRequest):
        if body.logprobs is not None:
            state.logprobs = []
        if ctx.tool_parser is not None and body.parses_tool_calls:
            state.tool_request = body
    ctx.in_flight[job_id] = state
    try:
        if state.attempt > 1:
            ctx.publisher.emit(
                job_id, JobEvent(state.next_id(), EventType.RETRY, {"attempt": state.attempt})
            )
        error: Failure | None
        if state.attempt > ctx.max_attempts:
            # A poison job (its workers keep dying on it): stop the loop here.
            status, error = (
                JobStatus.FAILED,
                Failure(f"gave up after {ctx.max_attempts} attempts", SERVER_ERROR),
            )
        elif isinstance(body, Failure):
            status, error = JobStatus.FAILED, body
        else:
            try:
                # Images are read after the claim's transaction, which holds a row lock.
                request = await generation_request(
                    job, body, state.request_id, ctx.bulk_priority, ctx.objects
                )
                if job.model in ctx.adapters:
                    request = dataclasses.replace(request, lora=job.model)
                if state.tool_request is not None and ctx.tool_parser is not None:
                    request = _with_tool_constraints(
                        ctx.tool_parser, body, request, ctx.engine.info.supports_structured_output
                    )
                status, error = await _admitted(
                    job.lane, ctx.admission, ctx.engine, request, state, ctx.publisher
                )
            except ImageUnavailable as exc:
                # The API checked the image when it took the request: losing it is ours.
                status, error = JobStatus.FAILED, Failure(str(exc), SERVER_ERROR)
            except Exception:
                # The engine broke, or the object store could not be reached: the job goes
                # back to the queue (for another worker, or this one once it recovers).
                async with ctx.sessions.begin() as session:
                    await jobs_repo.release_job(session, job_id, ctx.worker_id)
                raise
        try:
            return await _record_end(ctx, state, status, error)
        except Exception as exc:
            log.exception("could not record the end of job %s", job_id)
            state.deltas, state.pending = [], []
            state.tool_calls = state.result_content = None
            if state.logprobs is not None:
                state.logprobs, state.pending_logprobs = [], []
            message = f"could not record the result: {exc.__class__.__name__}"
            return await _record_end(ctx, state, JobStatus.FAILED, Failure(message, SERVER_ERROR))
    finally:
        ctx.in_flight.pop(job_id, None)


async def announce_expired(ctx: AttemptContext, job: Job) -> str:
    """A job the claim found past its deadline (and ended `expired`, never run): end its
    stream as the API's expiry sweep would, and give its reserved tokens back."""
    unused = unused_tokens(job.reserved_tokens, 0, 0)
    if ctx.limiter is not None and unused:
        try:
            await ctx.limiter.give_back(job.owner_id, unused)
        except Exception:
            log.warning("could not give back %d tokens of job %s", unused, job.id, exc_info=True)
    if ctx.metrics is not None:
        try:
            await record_job_end(ctx.metrics, job.model, JobStatus.EXPIRED.value)
        except Exception:
            log.warning("could not count the end of job %s", job.id, exc_info=True)
    # After the tokens: a client that sees `expired` may spend them at once.
    for event_type, data in terminal_events(JobStatus.EXPIRED, job):
        ctx.publisher.emit(job.id, JobEvent(FIRST_UNCLAIMED, event_type, data))
    return JobStatus.EXPIRED.value


def _stored_request(job: Job) -> StoredRequest | Failure:
    """The job's request, read once per attempt (everything after uses this copy). It was
    checked when written: a row that does not read now will not on a retry either."""
    try:
        return StoredRequest.load(job.request)
    except ValidationError as exc:
        return Failure(f"the stored request cannot be read: {exc}", SERVER_ERROR)


async def _admitted(
    lane: Lane,
    admission: EngineAdmission,
    engine: Engine,
    request: GenerationRequest,
    state: JobAttempt,
    publisher: EventPublisher,
) -> tuple[JobStatus, Failure | None]:
    """Generate once the engine admits the job (bulk jobs may wait for a slot)."""
    if lane != Lane.BULK:
        async with admission.interactive():
            with telemetry.engine_spans(state):
                return await _generate(engine, request, state, publisher)
    async with admission.bulk(lambda: state.cancel_requested) as admitted:
        if not admitted:
            return JobStatus.CANCELLED, None
        with telemetry.engine_spans(state):
            return await _generate(engine, request, state, publisher)


async def _generate(
    engine: Engine, request: GenerationRequest, state: JobAttempt, publisher: EventPublisher
) -> tuple[JobStatus, Failure | None]:
    try:
        async for delta in engine.generate(request):
            if delta.prompt_tokens is not None:
                state.prompt_tokens = delta.prompt_tokens
            state.completion_tokens += delta.new_tokens
            if delta.finish_reason is not None:
                state.finish_reason = delta.finish_reason
            if delta.logprobs is not None and state.logprobs is not None:
                if state.first_token_at is None and delta.text:
                    state.first_token_at = utcnow()
                publisher.add_text(state, _no_nul(delta.text), _logprob_entries(delta.logprobs))
            elif delta.text:
                if state.first_token_at is None:
                    state.first_token_at = utcnow()
                publisher.add_text(state, _no_nul(delta.text))
    except EngineRequestError as exc:
        return JobStatus.FAILED, Failure(str(exc), INVALID_REQUEST)
    except Exception as exc:
        # Not this request's fault: the engine itself is broken (vLLM's EngineDeadError,
        # a crashed kernel). The job goes back to the queue for a healthy worker.
        raise EngineBroken(str(exc)) from exc
    if state.cancel_requested:
        return JobStatus.CANCELLED, None
    if state.finish_reason == "abort":
        # Aborted in the engine, but nobody cancelled it: the worker is stopping. The job
        # goes back to the queue (run_claimed releases it) instead of ending half-done.
        raise WorkerStopping("the worker stopped while the job was generating")
    return JobStatus.SUCCEEDED, None


def _no_nul(text: str) -> str:
    # PostgreSQL text cannot hold NUL; replace it here, at the source, so the live stream
    # and the SQL replay carry the same text.
    return text.replace("\x00", "\ufffd")


def _logprob_entries(logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """The engine's logprobs as stored and published (OpenAI's chat shape, without bytes)."""
    return [
        {
            "token": _no_nul(lp.token),
            "logprob": lp.logprob,
            "top_logprobs": [{"token": _no_nul(t), "logprob": v} for t, v in lp.top],
        }
        for lp in logprobs
    ]


async def _record_end(
    ctx: AttemptContext, state: JobAttempt, status: JobStatus, error: Failure | None
) -> str:
    """SQL first, then the terminal events: a client that sees `done` finds the result."""
    ctx.publisher.settle(state)  # every delta has its event id before the deltas are stored
    if (
        status == JobStatus.SUCCEEDED
        and state.tool_request is not None
        and ctx.tool_parser is not None
    ):
        _find_tool_calls(ctx.tool_parser, state)
    outcome = jobs_repo.JobOutcome(
        status=status,
        deltas=state.deltas,
        finish_reason=state.finish_reason,
        prompt_tokens=state.prompt_tokens,
        completion_tokens=state.completion_tokens,
        first_token_at=state.first_token_at,
        error=error.message if error else None,
        error_code=error.code if error else None,
        started_at=state.started_at,
        logprobs=state.logprobs,
        tool_calls=state.tool_calls,
        result_content=state.result_content,
    )
    recorded = await ctx.outcomes.submit((state.job_id, outcome))
    if recorded is None:
        return "lost"
    for event_type, data in terminal_events(recorded, outcome):
        ctx.publisher.emit(state.job_id, JobEvent(state.next_id(), event_type, data))
    await _count_end(ctx, state, recorded, outcome)
    await _settle(ctx, state, outcome)
    return recorded.value


async def _count_end(
    ctx: AttemptContext, state: JobAttempt, status: JobStatus, outcome: jobs_repo.JobOutcome
) -> None:
    """Count the end that landed (storage/job_metrics.py). A cancelled job's end was
    counted by the cancel that made it terminal; its tokens and timings are counted here.
    Best effort, as settlement: a lost increment must not fail the job."""
    if ctx.metrics is None:
        return
    now = utcnow()
    ttft = queue_wait = e2e = None
    if state.started_at is not None and state.first_token_at is not None:
        ttft = (state.first_token_at - state.started_at).total_seconds()
    if state.created_at is not None:
        e2e = (now - state.created_at).total_seconds()
        if state.started_at is not None:
            queue_wait = (state.started_at - state.created_at).total_seconds()
    try:
        await record_job_end(
            ctx.metrics,
            state.model,
            status.value,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            ttft,
            queue_wait,
            e2e,
            ended=status != JobStatus.CANCELLED,
        )
    except Exception:
        log.warning("could not count the end of job %s", state.job_id, exc_info=True)


async def _settle(ctx: AttemptContext, state: JobAttempt, outcome: jobs_repo.JobOutcome) -> None:
    """Give back what the job reserved and did not use (api/core/ratelimit.py). Here,
    where the end is recorded, because the worker is the one place every run job ends
    (succeeded, failed or cancelled while running) and knows the real usage; only once the
    end has landed, so an attempt that lost its job gives nothing back. Best effort: Redis
    being away costs the key some budget for a minute, never the job."""
    unused = unused_tokens(state.reserved_tokens, outcome.prompt_tokens, outcome.completion_tokens)
    if ctx.limiter is None or state.owner_id is None or not unused:
        return
    try:
        await ctx.limiter.give_back(state.owner_id, unused)
    except Exception:
        log.warning("could not give back %d tokens of job %s", unused, state.job_id, exc_info=True)


def _with_tool_constraints(
    parser: ToolCallParser,
    body: StoredRequest,
    request: GenerationRequest,
    can_constrain: bool,
) -> GenerationRequest:
    """A request with tools generated as vLLM's parser adjusts it (worker/tool_calls.py).
    An engine without structured outputs generates unconstrained (the API refuses the
    forced choices there; `strict` tools under `auto` then go as under `auto` alone)."""
    how = parser.generation(body)
    sampling = dataclasses.replace(request.sampling, skip_special_tokens=how.skip_special_tokens)
    if how.constraint is not None and can_constrain:
        sampling = dataclasses.replace(sampling, structured_output=how.constraint)
    return dataclasses.replace(request, sampling=sampling)


def _find_tool_calls(parser: ToolCallParser, state: JobAttempt) -> None:
    """The whole reply through the tool-call parser. As in vLLM (and OpenAI), a reply that
    calls tools ends with finish_reason `tool_calls`, except under a named `tool_choice`,
    where it keeps the engine's (`stop`)."""
    assert state.tool_request is not None
    found = parser.parse_quietly("".join(state.deltas), state.tool_request)
    if found is not None:
        state.tool_calls, state.result_content = found.calls, found.content
        choice = state.tool_request.tool_choice or "auto"
        if choice == "auto" or (choice == "required" and state.finish_reason == "stop"):
            state.finish_reason = "tool_calls"
