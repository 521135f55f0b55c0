"""`/v1/admin/keys`: only the admin key (FERRY_ADMIN_KEY) reaches these routes. Any other
request, with another key, no key, or no admin key configured, gets the 404 of a path that
does not exist, before its body is read: the routes are not advertised (and not in the
OpenAPI document; docs/api.md describes them)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.exceptions import HTTPException

from api.admin.schemas import (
    KeyCreate,
    KeyCreated,
    KeyDeleted,
    KeyList,
    KeyPublic,
    KeyUpdate,
    WebhookSecret,
)
from api.admin.service import limits_to_store, merged_limits
from api.core.deps import SessionDep, StateDep
from api.core.errors import InvalidRequest, NotFound
from api.core.pages import After, split_page
from api.core.state import AppState
from storage.models import ApiKey
from storage.repositories import api_keys


class AdminRoute(APIRoute):
    """Checks the admin key before FastAPI reads the body or the parameters, so that a
    request without it cannot tell these routes from a missing path (not even by a 400)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def admin_only(request: Request) -> Response:
            state: AppState = request.app.state.ferry
            if not state.keys.is_admin(request.headers.get("authorization")):
                raise HTTPException(404)  # as Starlette answers an unknown path
            return await handler(request)

        return admin_only


router = APIRouter(
    prefix="/v1/admin", tags=["admin"], include_in_schema=False, route_class=AdminRoute
)


@router.post("/keys", status_code=201, response_model=KeyCreated)
async def create_key(body: KeyCreate, session: SessionDep, state: StateDep) -> KeyCreated:
    """A new key; its bearer token is in `key`, this once (only its hash is stored)."""
    row, token = await api_keys.create_admin_key(session, body.name, limits_to_store(body.limits))
    public = KeyPublic.from_row(row, state.settings.default_limits())
    return KeyCreated(**public.model_dump(), key=token)


@router.get("/keys", response_model=KeyList)
async def list_keys(
    session: SessionDep,
    state: StateDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> KeyList:
    """Every key (revoked ones too), newest first, `limit` at a time."""
    rows = await api_keys.list_keys(session, after=after, limit=limit + 1)
    page, has_more = split_page(rows, limit)
    defaults = state.settings.default_limits()
    return KeyList.of(page, [KeyPublic.from_row(row, defaults) for row in page], has_more)


@router.get("/keys/{key_id}", response_model=KeyPublic)
async def get_key(key_id: str, session: SessionDep, state: StateDep) -> KeyPublic:
    return KeyPublic.from_row(await _key(session, key_id), state.settings.default_limits())


@router.patch("/keys/{key_id}", response_model=KeyPublic)
async def update_key(
    key_id: str, body: KeyUpdate, session: SessionDep, state: StateDep
) -> KeyPublic:
    """Rename the key and/or change its limits: each limit given replaces the stored one,
    `null` clears it."""
    current = await _key(session, key_id)
    limits = merged_limits(current.limits, body.limits) if body.limits is not None else None
    row = await api_keys.update_key(session, key_id, name=body.name, limits=limits)
    if row is None:
        raise _not_found(key_id)
    public = KeyPublic.from_row(row, state.settings.default_limits())
    await _changed(session, state)
    return public


@router.delete("/keys/{key_id}", response_model=KeyDeleted)
async def revoke_key(key_id: str, session: SessionDep, state: StateDep) -> KeyDeleted:
    """Revoke the key: refused (401) from now on, by every API process within
    FERRY_KEY_CACHE_SECONDS; its jobs, files and batches stay."""
    if (await _key(session, key_id)).source == "builtin":
        raise InvalidRequest(
            "The built-in owner (authentication off) cannot be revoked: turn authentication "
            "on (FERRY_AUTH) and it serves no request.",
            param="key_id",
        )
    await api_keys.revoke_key(session, key_id)
    await _changed(session, state)
    return KeyDeleted(id=key_id)


@router.post("/keys/{key_id}/webhook_secret", response_model=WebhookSecret)
async def rotate_webhook_secret(key_id: str, session: SessionDep) -> WebhookSecret:
    """A new signing secret for the key's webhooks; the old one no longer signs."""
    secret = await api_keys.rotate_webhook_secret(session, key_id)
    if secret is None:
        raise _not_found(key_id)
    return WebhookSecret(secret=secret)


@router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def elsewhere(path: str) -> None:
    """Any other path or method under /v1/admin: 404, not a 405 that would name the
    methods a route takes."""
    raise HTTPException(404)


async def _key(session: AsyncSession, key_id: str) -> ApiKey:
    row = await api_keys.get_key(session, key_id)
    if row is None:
        raise _not_found(key_id)
    return row


async def _changed(session: AsyncSession, state: AppState) -> None:
    """Committed before this process forgets its cached keys: a request in between must
    not cache the old row again (other processes' caches expire on their own)."""
    await session.commit()
    state.keys.forget()


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id `{key_id}`.", param="key_id")
