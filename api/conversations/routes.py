"""Stored chat history: `/v1/conversations`. Jobs continue one with `conversation_id`."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Query, Request

from api.conversations.schemas import (
    ConversationCreate,
    ConversationDeleted,
    ConversationList,
    ConversationPublic,
)
from api.core.deps import CurrentKey, SessionDep
from api.core.errors import NotFound, error_responses
from api.core.pages import After, split_page
from storage.models import Conversation
from storage.repositories import conversations as conversations_repo

router = APIRouter(prefix="/v1/conversations", tags=["conversations"])


@router.post(
    "", status_code=201, response_model=ConversationPublic, responses=error_responses(400, 401, 413)
)
async def create_conversation(
    key: CurrentKey,
    session: SessionDep,
    body: Annotated[ConversationCreate | None, Body()] = None,
) -> ConversationPublic:
    """Start an empty conversation. Send its id as `conversation_id` with
    `POST /v1/jobs` or `POST /v1/chat/completions`: the prompt is the stored history plus
    the request's messages, and when the job succeeds its turn and the reply are
    appended (a failed or cancelled job appends nothing)."""
    title = body.title if body is not None else None
    conversation = await conversations_repo.create(session, key, title)
    return ConversationPublic.from_row(conversation)


@router.get("", response_model=ConversationList, responses=error_responses(400, 401))
async def list_conversations(
    key: CurrentKey,
    session: SessionDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ConversationList:
    """This key's conversations, newest first, `limit` at a time (without messages)."""
    rows = await conversations_repo.list_owned(session, key, after=after, limit=limit + 1)
    page, has_more = split_page(rows, limit)
    return ConversationList.of(page, [ConversationPublic.from_row(c) for c in page], has_more)


@router.get(
    "/{conversation_id}", response_model=ConversationPublic, responses=error_responses(401, 404)
)
async def get_conversation(
    conversation_id: str, key: CurrentKey, session: SessionDep, request: Request
) -> ConversationPublic:
    """One conversation with its messages in order. A user message's images are links
    to `GET /v1/images/{sha256}` on this API; an assistant message's reasoning is in
    `reasoning_content`."""
    conversation = await _owned(session, conversation_id, key)
    messages = await conversations_repo.messages_of(session, conversation.id)
    image_url = str(request.base_url).rstrip("/") + "/v1/images/{sha256}"
    return ConversationPublic.from_row(conversation, messages, image_url)


@router.delete(
    "/{conversation_id}", response_model=ConversationDeleted, responses=error_responses(401, 404)
)
async def delete_conversation(
    conversation_id: str, key: CurrentKey, session: SessionDep
) -> ConversationDeleted:
    """Delete a conversation and its messages. Its jobs stay (no longer linked to it)."""
    if not await conversations_repo.delete_owned(session, conversation_id, key):
        raise _not_found(conversation_id)
    return ConversationDeleted(id=conversation_id)


async def _owned(session: SessionDep, conversation_id: str, key: str) -> Conversation:
    conversation = await conversations_repo.get_owned(session, conversation_id, key)
    if conversation is None:
        raise _not_found(conversation_id)
    return conversation


def _not_found(conversation_id: str) -> NotFound:
    return NotFound(f"No conversation with id `{conversation_id}`.", param="conversation_id")
