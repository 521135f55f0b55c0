"""Submit and poll: `/v1/jobs`, and the job's Server-Sent Events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Response

from api.core import ratelimit
from api.core.deps import CurrentCaller, CurrentKey, OwnedJob, SessionDep, StateDep
from api.core.errors import ACCEPTED_RATE_HEADERS, InvalidRequest, error_responses
from api.core.idempotency import IdempotentCreate
from api.core.idempotency import responses as idempotent_responses
from api.core.pages import NO_NUL, After, split_page
from api.jobs import service as jobs_service
from api.jobs.deadlines import CancelAfter, with_cancel_after
from api.jobs.schemas import JobCreate, JobDeleted, JobList, JobPublic
from api.streaming import sse
from api.streaming.job_events import job_event_batches
from api.webhooks import urls as webhook_urls
from storage.events import EventId
from storage.keys import Lane
from storage.models import JobStatus
from storage.repositories import jobs as jobs_repo

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses={
        **error_responses(400, 401, 404, 413, 429, 503),
        **idempotent_responses(202, ACCEPTED_RATE_HEADERS),
    },
)
async def create_job(
    body: JobCreate,
    caller: CurrentCaller,
    state: StateDep,
    response: Response,
    cancel_after: CancelAfter,
    idempotency: IdempotentCreate,
) -> JobPublic:
    """Accept an OpenAI chat-completions request to run asynchronously.

    The job is stored before this returns (202) and runs on a worker serving `model`
    (omitted or an alias: the default model, as in `/v1/chat/completions`; the job names
    the model it went to).
    Poll `GET /v1/jobs/{id}` or stream `GET /v1/jobs/{id}/events`, or give a `webhook`
    to be called when it starts and completes (see Webhooks in docs/api.md).
    A job still queued at its deadline (`deadline_seconds` or the `Cancel-After` header;
    by default FERRY_DEADLINE_INTERACTIVE_SECONDS) ends `expired` and never runs.
    """
    # Before the job is built: a refused webhook stores nothing (not even its images).
    hook = await webhook_urls.check_subscription(
        body.webhook, body.webhook_events_filter, state.settings
    )
    with_cancel_after(state.settings, body, cancel_after)
    tokens = ratelimit.chat_tokens(body, state.settings)
    async with ratelimit.admission(state, caller, tokens=tokens, body=body) as admitted:
        [job] = admitted.reserve([await jobs_service.build_chat_job(state, caller.id, body)])
    job.webhook_url, job.webhook_events = hook
    response.headers.update(admitted.headers)
    await jobs_service.submit(state.intake, [job])
    public = JobPublic.from_row(job)
    await idempotency.record(202, public, job.id)
    return public


@router.get("", response_model=JobList, responses=error_responses(400, 401))
async def list_jobs(
    key: CurrentKey,
    session: SessionDep,
    status: JobStatus | None = None,
    lane: Annotated[
        Lane | None,
        Query(description="`interactive` (jobs sent to the API) or `bulk` (batch lines)"),
    ] = None,
    batch_id: Annotated[
        str | None, Query(description="Only this batch's lines", pattern=NO_NUL)
    ] = None,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> JobList:
    """This key's jobs, newest first, `limit` at a time. Batch lines are jobs too (up to
    50,000 per batch): `lane=interactive` leaves them out, `batch_id` lists one batch's."""
    rows = await jobs_repo.list_owned_jobs(
        session,
        key,
        status=status,
        after=after,
        limit=limit + 1,
        lane=lane,
        batch_id=batch_id,
    )
    page, has_more = split_page(rows, limit)
    return JobList.of(page, [JobPublic.from_row(j) for j in page], has_more)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(401, 404))
async def get_job(job: OwnedJob) -> JobPublic:
    """Status, result, usage and timings of one job."""
    return JobPublic.from_row(job)


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=error_responses(401, 404, 409))
async def cancel_job(job: OwnedJob, state: StateDep, session: SessionDep) -> JobPublic:
    """Cancel a queued job (it never runs) or a running one (aborted in the engine).

    Its event stream ends with a `cancelled` event. A finished job answers 409.
    """
    cancelled = await jobs_service.cancel(
        state.events, state.cancels, session, job, state.limiter, state.redis
    )
    return JobPublic.from_row(cancelled)


@router.delete("/{job_id}", response_model=JobDeleted, responses=error_responses(401, 404, 409))
async def delete_job(job: OwnedJob, state: StateDep, session: SessionDep) -> JobDeleted:
    """Delete a finished job: its row (result, deltas, usage) and its event stream.

    A job still queued or running answers 409 (cancel it first); so does a batch line,
    which goes with its batch. Deleting it again is a 404.
    """
    await jobs_service.delete(state.events, session, job)
    return JobDeleted(id=job.id)


# What `EventId.parse` takes (empty: from the start); checked there, with its own message.
# A header is never null: the document says string, not FastAPI's "string or null".
_EVENT_ID = {"anyOf": None, "type": "string", "pattern": "^([0-9]+-[0-9]+)?$"}


def _last_event_id(
    last_event_id: Annotated[
        str | None, Header(alias="Last-Event-ID", json_schema_extra=_EVENT_ID)
    ] = None,
    last_event_id_query: Annotated[
        str | None, Query(alias="last_event_id", json_schema_extra=_EVENT_ID)
    ] = None,
) -> EventId | None:
    # Both are checked (a malformed one is a 400 even beside a good one); the header wins.
    ids = [_event_id(raw) for raw in (last_event_id, last_event_id_query) if raw]
    return ids[0] if ids else None


def _event_id(raw: str) -> EventId:
    try:
        return EventId.parse(raw)
    except ValueError:
        raise InvalidRequest(
            f"Last-Event-ID `{raw}` is not an event id of the form `<attempt>-<seq>`.",
            param="Last-Event-ID",
        ) from None


# Parsed in a dependency: a bad id is a 400 before the stream starts.
LastEventId = Annotated[EventId | None, Depends(_last_event_id)]


@router.get(
    "/{job_id}/events",
    response_class=sse.EventStreamResponse,
    responses={
        200: {"content": sse.openapi_content("The event's JSON", job_events=True)},
        **error_responses(400, 401, 404),
    },
)
async def job_event_stream(
    job: OwnedJob,
    state: StateDep,
    after: LastEventId,
) -> sse.EventStreamResponse:
    """Server-Sent Events: `delta`, `usage`, then one of `done`, `error`, `cancelled`,
    `expired` (still queued at its deadline: it never ran).

    Every event has an `id:`. Reconnect with `Last-Event-ID` (header, or the
    `last_event_id` query parameter) to any API process, also after the job has finished,
    and you get exactly the events you missed. A `retry` event means the job's worker
    died and a new attempt starts over. The connection closes after the terminal event.
    Events that arrive together are sent in one write.
    """
    settings = state.settings
    batches = job_event_batches(
        state.event_sources,
        job.id,
        after,
        keepalive_seconds=settings.sse_keepalive_seconds,
        max_seconds=settings.sse_max_seconds,
        traceparent=job.traceparent,
    )
    return sse.EventStreamResponse(sse.job_event_writes(batches), headers=sse.HEADERS)
