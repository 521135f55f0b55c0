"""Wire types of stored conversations: create, list, read, delete."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.core.pages import CursorPage
from storage.models import Conversation, Message


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(
        None, max_length=200, description="Defaults to the start of the first question"
    )


class ConversationImage(BaseModel):
    url: str = Field(description="Where the API serves the image (same keys as this call)")
    sha256: str
    mime: str | None = None
    width: int | None = None
    height: int | None = None


class ConversationMessage(BaseModel):
    id: int
    role: str
    content: str
    reasoning_content: str | None = Field(
        None, description="The model's `<think>` text, kept apart from `content`"
    )
    images: list[ConversationImage]
    job_id: str | None = Field(description="The job that carried this turn")
    created_at: float

    @classmethod
    def from_row(cls, message: Message, image_url: str) -> ConversationMessage:
        refs: list[dict[str, Any]] = message.images or []
        return cls(
            id=message.id,
            role=message.role,
            content=message.content,
            reasoning_content=message.reasoning,
            images=[
                ConversationImage(url=image_url.format(sha256=ref["sha256"]), **ref) for ref in refs
            ],
            job_id=message.job_id,
            created_at=message.created_at.timestamp(),
        )


class ConversationPublic(BaseModel):
    id: str
    object: Literal["conversation"] = "conversation"
    title: str | None
    default: bool = Field(
        description="The key's default conversation: the history PAI-EAS's "
        "`/infer_forward`, `/get_history` and `/clear_history` keep"
    )
    created_at: float
    updated_at: float
    messages: list[ConversationMessage] | None = Field(
        None, description="In order; only when one conversation is read"
    )

    @classmethod
    def from_row(
        cls,
        conversation: Conversation,
        messages: list[Message] | None = None,
        image_url: str = "",
    ) -> ConversationPublic:
        return cls(
            id=conversation.id,
            title=conversation.title,
            default=conversation.default_for is not None,
            created_at=conversation.created_at.timestamp(),
            updated_at=conversation.updated_at.timestamp(),
            messages=None
            if messages is None
            else [ConversationMessage.from_row(m, image_url) for m in messages],
        )


class ConversationList(CursorPage[ConversationPublic]):
    pass


class ConversationDeleted(BaseModel):
    id: str
    object: Literal["conversation.deleted"] = "conversation.deleted"
    deleted: bool = True
