"""OpenAI Batches API: create, watch, list and cancel batches of JSONL requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response

from api.batches import service
from api.batches.schemas import BatchCreate, BatchList, BatchPublic
from api.batches.supervisor import BatchSupervisor
from api.core import ratelimit
from api.core.deps import CurrentCaller, CurrentKey, SessionDep, StateDep
from api.core.errors import ACCEPTED_RATE_HEADERS, NotFound, error_responses
from api.core.idempotency import IdempotentCreate
from api.core.idempotency import responses as idempotent_responses
from api.core.pages import After, split_page
from storage.models import Batch
from storage.repositories import batches as batches_repo

router = APIRouter(prefix="/v1/batches", tags=["batches"])


async def get_supervisor(request: Request) -> BatchSupervisor:
    supervisor: BatchSupervisor = request.app.state.batch_supervisor
    return supervisor


SupervisorDep = Annotated[BatchSupervisor, Depends(get_supervisor)]


async def owned_batch(batch_id: str, key: CurrentKey, session: SessionDep) -> Batch:
    """The batch, if this key owns it; another key's batch is as absent as a missing one."""
    batch = await batches_repo.get_owned_batch(session, batch_id, key)
    if batch is None:
        raise NotFound(f"No batch with id `{batch_id}`.", param="batch_id")
    return batch


OwnedBatch = Annotated[Batch, Depends(owned_batch)]


@router.post(
    "",
    response_model=BatchPublic,
    responses={
        **error_responses(400, 401, 404, 413, 429),
        **idempotent_responses(200, ACCEPTED_RATE_HEADERS),
    },
)
async def create_batch(
    body: BatchCreate,
    caller: CurrentCaller,
    state: StateDep,
    session: SessionDep,
    supervisor: SupervisorDep,
    idempotency: IdempotentCreate,
    response: Response,
) -> BatchPublic:
    """Run every line of an uploaded `purpose=batch` file as a bulk job.

    The batch starts `validating`: its lines are checked (invalid ones go to the error
    file with their line numbers), then it is `in_progress` while the lines run at bulk
    priority beside interactive traffic, `finalizing` while its files are written, and
    `completed`. A file with no valid line makes it `failed` (see `errors`). A batch not
    done within `completion_window` ends `expired`, keeping what finished.
    """
    batch = await service.create_batch(state.settings, session, caller.id, body)
    # Its lines against batch_lines_per_day (a 429 rolls the batch back: nothing stored).
    lines = await service.input_lines(session, batch)
    async with ratelimit.admission(state, caller, lines=lines) as admitted:
        admitted.reserve([])
    response.headers.update(admitted.headers)
    await session.commit()
    supervisor.expand_soon(batch.id)
    public = (await service.public(session, [batch]))[0]
    await idempotency.record(200, public, batch.id)
    return public


@router.get("", response_model=BatchList, responses=error_responses(400, 401))
async def list_batches(
    key: CurrentKey,
    session: SessionDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """This key's batches, newest first, `limit` at a time."""
    rows = await batches_repo.list_owned_batches(session, key, after=after, limit=limit + 1)
    page, has_more = split_page(rows, limit)
    return BatchList.of(page, await service.public(session, list(page)), has_more)


@router.get("/{batch_id}", response_model=BatchPublic, responses=error_responses(401, 404))
async def get_batch(batch: OwnedBatch, session: SessionDep) -> BatchPublic:
    """Status, request counts (counted from the lines' jobs) and token usage."""
    return (await service.public(session, [batch]))[0]


@router.post(
    "/{batch_id}/cancel", response_model=BatchPublic, responses=error_responses(401, 404, 409)
)
async def cancel_batch(
    batch: OwnedBatch, state: StateDep, session: SessionDep, supervisor: SupervisorDep
) -> BatchPublic:
    """Cancel: queued lines never run, running ones are aborted, finished ones keep their
    results. The batch is `cancelling`, then `cancelled` with its output and error files.
    A batch that has already ended (or is finalizing) answers 409."""
    cancelled = await service.cancel_batch(state.cancels, session, batch, supervisor, state.redis)
    return (await service.public(session, [cancelled]))[0]
