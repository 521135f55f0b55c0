"""SQLAlchemy 2 models. SQL is Ferry's source of truth; Redis is only transport.

Wire types (what clients send and see) live in api/schemas, never here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class JobStatus(StrEnum):
    QUEUED = "queued"  # accepted and in SQL; a Celery message is (or will be) on its way
    RUNNING = "running"  # claimed by a worker holding a live lease
    SUCCEEDED = "succeeded"  # finished; result, usage and timings are final
    FAILED = "failed"  # the engine or the request failed; `error` says why
    CANCELLED = "cancelled"  # cancelled by its owner; partial output is kept

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # SHA-256 of the bearer token; the token itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_id_id", "owner_id", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    )

    # Time-ordered ids, so "newest first" and cursor pagination are ORDER BY id.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(255))
    # "chat" (messages) or "completion" (prompt).
    kind: Mapped[str] = mapped_column(String(16), default="chat")
    # Celery lane: "interactive" or "bulk".
    lane: Mapped[str] = mapped_column(String(16), default="interactive")
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    request: Mapped[dict[str, Any]] = mapped_column(JSONType)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)

    result_text: Mapped[str | None] = mapped_column(Text)
    # The final attempt's text deltas, in order: lets SSE replay exactly from SQL
    # after the Redis stream has expired.
    deltas: Mapped[list[str] | None] = mapped_column(JSONType)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)

    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Last time a Celery message was sent for this job.
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    first_token_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # started -> first token of the final attempt, for the metrics histogram.
    ttft_ms: Mapped[int | None] = mapped_column(Integer)
    # Set when the job continues a stored conversation: its prompt is that history plus
    # the new turn, and its reply is appended there when (and only when) it succeeds.
    conversation_id: Mapped[str | None] = mapped_column(
        ForeignKey("conversations.id", ondelete="SET NULL")
    )

    @property
    def job_status(self) -> JobStatus:
        return JobStatus(self.status)


class Conversation(Base):
    """Chat history owned by one API key (OpenAI-style jobs, PAI-EAS /infer_forward)."""

    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_owner_id_id", "owner_id", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    title: Mapped[str | None] = mapped_column(String(200))
    # The owner's id when this is their default conversation (the one PAI-EAS's
    # /infer_forward, /get_history and /clear_history use); unique, so one per key.
    default_for: Mapped[str | None] = mapped_column(String(40), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Message(Base):
    """One turn of a conversation; images are object-store references, never bytes."""

    __tablename__ = "messages"
    __table_args__ = (Index("ix_messages_conversation_id_id", "conversation_id", "id"),)

    # Autoincrement: a conversation's messages in insertion order are ORDER BY id.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    # [{"sha256": ..., "mime": ...}, ...] in the order the images appear in the turn.
    images: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    # The model's reasoning (text inside <think>…</think>) for assistant turns.
    reasoning: Mapped[str | None] = mapped_column(Text)
    # The job that produced (assistant) or carried (user) this turn.
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
