"""Dependencies, as Annotated aliases, so routes read like sentences."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.ext.asyncio import AsyncSession

from api.core.errors import NotFound
from api.core.limits import Caller
from api.core.state import AppState
from storage.models import Job
from storage.repositories import jobs as jobs_repo


async def get_state(request: Request) -> AppState:
    # async on purpose: FastAPI runs a sync dependency on a thread pool, per request.
    state: AppState = request.app.state.ferry
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """A session that commits when the route returns normally, rolls back otherwise."""
    async with state.db.transaction() as session:
        yield session


# Function scope: the commit runs when the route returns, before the response is sent. (The
# default, request scope, runs it after the response has gone: a client could be told 201
# and then not find what it created. It would also hold the connection while a response
# streams.)
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


# The header as sent (`Bearer <key>`, or the bare key as PAI-EAS clients send it); read
# through a security scheme so the OpenAPI document says which routes need a key.
_API_KEY = APIKeyHeader(
    name="Authorization",
    scheme_name="APIKey",
    auto_error=False,
    description="`Bearer <key>` (OpenAI), or the bare key (PAI-EAS)",
)


async def current_caller(
    state: StateDep, authorization: Annotated[str | None, Security(_API_KEY)]
) -> Caller:
    return await state.keys.caller_of(authorization)


# The API key making the request, with its effective limits.
CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def current_key(caller: CurrentCaller) -> str:
    return caller.id


# The id of the API key making the request.
CurrentKey = Annotated[str, Depends(current_key)]


async def owned_job(job_id: str, key: CurrentKey, state: StateDep) -> Job:
    """The job, if this key owns it; another key's job is as absent as a missing one.

    Read in a session of its own, closed at once: an SSE route holding this dependency
    for an hour must not hold a pooled connection with it.
    """
    async with state.db.read() as session:
        job = await jobs_repo.get_owned_job(session, job_id, key)
    if job is None:
        raise NotFound(f"No job with id `{job_id}`.", param="job_id")
    return job


OwnedJob = Annotated[Job, Depends(owned_job)]
