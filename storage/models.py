"""SQLAlchemy 2 models. SQL is Ferry's source of truth; Redis is only transport.

Wire types (what clients send and see) live in api/ (each feature's schemas.py), never here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from storage.keys import Lane

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


E = TypeVar("E", bound=StrEnum)


class StrEnumType(TypeDecorator[E]):
    """A str enum stored as its value in a VARCHAR column (the column stays a string, so
    no migration) and read back as the enum."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum
        self.length = length

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else self.enum(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


class Base(DeclarativeBase):
    pass


class JobStatus(StrEnum):
    QUEUED = "queued"  # accepted and in SQL; a Celery message is (or will be) on its way
    RUNNING = "running"  # claimed by a worker holding a live lease
    SUCCEEDED = "succeeded"  # finished; result, usage and timings are final
    FAILED = "failed"  # the engine or the request failed; `error` says why
    CANCELLED = "cancelled"  # cancelled by its owner; partial output is kept
    EXPIRED = "expired"  # still queued at its deadline: it never ran

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED}
)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # SHA-256 of the bearer token; the token itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Where the key came from: "env" (FERRY_API_KEYS; revoked at start once no longer
    # listed there), "admin" (made through /v1/admin/keys) or "builtin" (auth off).
    source: Mapped[str] = mapped_column(String(16), default="env", server_default="env")
    # The key's own limits (api/core/limits.py KeyLimits; a field left out takes the
    # deployment's default). NULL: all defaults.
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # Standard Webhooks signing secret (`whsec_` + base64), made on first use.
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    # Set once revoked: the key is refused from then on; its rows stay.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


# Partial-index predicates (SQL text, shared by the model, the migration and the queries
# that must repeat them word for word for the planner to use the index).
BATCH_UNSENT = "batch_id IS NOT NULL AND status = 'queued' AND enqueued_at IS NULL"
BATCH_OUTSTANDING = (
    "batch_id IS NOT NULL AND enqueued_at IS NOT NULL AND status IN ('queued', 'running')"
)
INTERACTIVE_OPEN = "lane = 'interactive' AND status IN ('queued', 'running')"
# Interactive jobs accepted but not yet released to the workers (api/jobs/dispatch.py).
INTERACTIVE_HELD = "lane = 'interactive' AND status = 'queued' AND enqueued_at IS NULL"
# A key's interactive jobs waiting (sent to the workers or not): its max_queued_jobs.
INTERACTIVE_QUEUED = "lane = 'interactive' AND status = 'queued'"
# Queued jobs with a deadline: the expiry sweep reads them by deadline.
QUEUED_WITH_DEADLINE = "status = 'queued' AND deadline_at IS NOT NULL"
# Finished jobs not part of a batch (batch lines go with their batch): the retention
# sweep reads them by finished_at (api/ops/retention.py).
UNBATCHED_FINISHED = (
    "batch_id IS NULL AND status IN ('succeeded', 'failed', 'cancelled', 'expired')"
)
# Jobs that continue a conversation: deleting a conversation sets theirs to NULL.
IN_CONVERSATION = "conversation_id IS NOT NULL"


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_owner_id_id", "owner_id", "id"),
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ux_jobs_batch_id_custom_id", "batch_id", "custom_id", unique=True),
        Index("ix_jobs_batch_id_status", "batch_id", "status"),
        # Batch lines the feeder has not sent yet, and those sent and not finished: the
        # feeder reads both every pass (storage/repositories/batch_jobs.py).
        Index(
            "ix_jobs_batch_unsent",
            "model",
            "id",
            postgresql_where=text(BATCH_UNSENT),
            sqlite_where=text(BATCH_UNSENT),
        ),
        Index(
            "ix_jobs_batch_outstanding",
            "model",
            postgresql_where=text(BATCH_OUTSTANDING),
            sqlite_where=text(BATCH_OUTSTANDING),
        ),
        # Interactive jobs in flight: while a model has some, batch lines get a narrower
        # window on it (api/batches/feeder.py).
        Index(
            "ix_jobs_interactive_open",
            "model",
            postgresql_where=text(INTERACTIVE_OPEN),
            sqlite_where=text(INTERACTIVE_OPEN),
        ),
        # The dispatcher picks each model's held jobs key by key, in priority order.
        Index(
            "ix_jobs_interactive_held",
            "model",
            "owner_id",
            "priority",
            "id",
            postgresql_where=text(INTERACTIVE_HELD),
            sqlite_where=text(INTERACTIVE_HELD),
        ),
        # A key's queued interactive jobs, counted by synchronous routes (max_queued_jobs).
        Index(
            "ix_jobs_owner_queued",
            "owner_id",
            postgresql_where=text(INTERACTIVE_QUEUED),
            sqlite_where=text(INTERACTIVE_QUEUED),
        ),
        # Queued jobs by deadline, for the expiry sweep.
        Index(
            "ix_jobs_queued_deadline",
            "deadline_at",
            postgresql_where=text(QUEUED_WITH_DEADLINE),
            sqlite_where=text(QUEUED_WITH_DEADLINE),
        ),
        # Finished interactive jobs by age, for the retention sweep.
        Index(
            "ix_jobs_unbatched_finished",
            "finished_at",
            postgresql_where=text(UNBATCHED_FINISHED),
            sqlite_where=text(UNBATCHED_FINISHED),
        ),
        # Without it, every conversation deleted scans the jobs table for its ON DELETE.
        Index(
            "ix_jobs_conversation_id",
            "conversation_id",
            postgresql_where=text(IN_CONVERSATION),
            sqlite_where=text(IN_CONVERSATION),
        ),
    )

    # Time-ordered ids, so "newest first" and cursor pagination are ORDER BY id.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    model: Mapped[str] = mapped_column(String(255))
    # "chat" (messages) or "completion" (prompt).
    kind: Mapped[str] = mapped_column(String(16), default="chat")
    lane: Mapped[Lane] = mapped_column(StrEnumType(Lane, 16), default=Lane.INTERACTIVE)
    status: Mapped[JobStatus] = mapped_column(StrEnumType(JobStatus, 16), default=JobStatus.QUEUED)
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
    # A failed job's kind of failure: "invalid_request" (the request's fault: a 400) or
    # "server_error" (Ferry's: a 5xx). NULL for jobs that did not fail.
    error_code: Mapped[str | None] = mapped_column(String(32))
    # With `logprobs` asked for: per delta (aligned with `deltas`), its tokens' logprobs
    # ({"token", "logprob", "top_logprobs": [{"token", "logprob"}]}).
    logprobs: Mapped[list[list[dict[str, Any]]] | None] = mapped_column(JSONType)
    # The tools the reply calls (OpenAI's `tool_calls`), found by the worker's tool-call
    # parser, and the reply's content without the tool-call text (and without reasoning).
    # NULL when the reply calls no tool.
    tool_calls: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    result_content: Mapped[str | None] = mapped_column(Text)

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
    # Set for the lines of a batch: at most one job per (batch, custom_id), which is what
    # makes a batch's results exactly-once however often expansion or delivery repeats.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    custom_id: Mapped[str | None] = mapped_column(String(256))
    # Tokens counted against the key's tokens_per_minute when accepted (prompt estimate +
    # max completion); the difference from the real usage is given back when it ends.
    reserved_tokens: Mapped[int | None] = mapped_column(Integer)
    # A signed webhook (storage/repositories/webhooks.py) to this URL on the events named
    # in webhook_events ("start", "completed"); NULL: none.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)
    # A job still queued at this time never runs: it ends `expired`.
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # W3C `traceparent` of the request that made the job (when tracing is on), so the
    # worker's spans join the API's trace.
    traceparent: Mapped[str | None] = mapped_column(String(64))


class Conversation(Base):
    """Chat history owned by one API key (OpenAI-style jobs, PAI-EAS /infer_forward)."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_owner_id_id", "owner_id", "id"),
        # Idle conversations by age, for the retention sweep.
        Index("ix_conversations_updated_at", "updated_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    title: Mapped[str | None] = mapped_column(String(200))
    # The owner's id when this is their default conversation (the one PAI-EAS's
    # /infer_forward, /get_history and /clear_history use); unique, so one per key.
    default_for: Mapped[str | None] = mapped_column(String(40), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


WITH_IMAGES = "images IS NOT NULL"


class Message(Base):
    """One turn of a conversation; images are object-store references, never bytes."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        # Messages that carry images: the retention sweep's reference check reads them.
        Index(
            "ix_messages_with_images",
            "conversation_id",
            postgresql_where=text(WITH_IMAGES),
            sqlite_where=text(WITH_IMAGES),
        ),
    )

    # Autoincrement: a conversation's messages in insertion order are ORDER BY id.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    # [{"sha256": ..., "mime": ...}, ...] in the order the images appear in the turn.
    images: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    # The model's reasoning (text inside <think>…</think>) for assistant turns.
    reasoning: Mapped[str | None] = mapped_column(Text)
    # The job that produced (assistant) or carried (user) this turn.
    job_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class File(Base):
    """An uploaded batch input, or a batch's output or error file; the bytes live in the
    object store under `storage.objects.file_key(id)`."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_owner_id_id", "owner_id", "id"),
        Index("ix_files_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    # "batch" (uploaded input) or "batch_output" (written by Ferry).
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    # Non-blank lines, and the distinct `url`s they call (checked against a batch's
    # endpoint when the batch is created).
    line_count: Mapped[int] = mapped_column(Integer, default=0)
    urls: Mapped[list[str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BatchStatus(StrEnum):
    VALIDATING = "validating"  # created; its lines are not yet jobs
    FAILED = "failed"  # no line could run (see `errors`), or the input was unreadable
    IN_PROGRESS = "in_progress"  # its lines are jobs, running on the bulk lane
    FINALIZING = "finalizing"  # every line ended (or the window passed); files being written
    COMPLETED = "completed"  # output and error files are ready
    EXPIRED = "expired"  # the completion window passed; finished lines' results kept
    CANCELLING = "cancelling"  # cancel asked; queued lines dropped, running ones aborting
    CANCELLED = "cancelled"  # cancelled; finished lines' results kept

    @property
    def is_terminal(self) -> bool:
        return self in (
            BatchStatus.FAILED,
            BatchStatus.COMPLETED,
            BatchStatus.EXPIRED,
            BatchStatus.CANCELLED,
        )


BATCH_ENDED = "status IN ('failed', 'completed', 'expired', 'cancelled')"


class Batch(Base):
    """An OpenAI-style batch: one input file, one job per valid line."""

    __tablename__ = "batches"
    __table_args__ = (
        Index("ix_batches_owner_id_id", "owner_id", "id"),
        Index("ix_batches_status", "status"),
        # Ended batches by age, for the retention sweep.
        Index(
            "ix_batches_ended_created_at",
            "created_at",
            postgresql_where=text(BATCH_ENDED),
            sqlite_where=text(BATCH_ENDED),
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    endpoint: Mapped[str] = mapped_column(String(64))
    # No foreign key: the input file may be deleted while the batch's record stays.
    input_file_id: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[BatchStatus] = mapped_column(
        StrEnumType(BatchStatus, 16), default=BatchStatus.VALIDATING
    )
    # What the batch ends as once its jobs have all stopped: completed, cancelled, expired.
    outcome: Mapped[BatchStatus | None] = mapped_column(StrEnumType(BatchStatus, 16))
    # The lines' model when they all name one.
    model: Mapped[str | None] = mapped_column(String(255))
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    # Batch-level errors (OpenAI `errors.data`): [{"code", "message", "param", "line"}].
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSONType)
    # Non-blank input lines, and how many of them were invalid (never became jobs).
    request_total: Mapped[int] = mapped_column(Integer, default=0)
    invalid_count: Mapped[int] = mapped_column(Integer, default=0)
    # Chosen when finalizing starts, so that writing the files can be repeated after a crash
    # and land under the same ids; shown once the batch has ended.
    output_file_id: Mapped[str | None] = mapped_column(String(40))
    error_file_id: Mapped[str | None] = mapped_column(String(40))
    # Whoever expands the batch holds it until then (a crashed API's batch is taken over).
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # A signed webhook when the batch ends, on the events in webhook_events ("completed",
    # "failed", "expired", "cancelled"); NULL: none.
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_events: Mapped[list[str] | None] = mapped_column(JSONType)


class BatchLineError(Base):
    """An input line that never became a job (bad JSON, a repeated custom_id, an invalid
    body...): it goes to the batch's error file with its line number."""

    __tablename__ = "batch_line_errors"
    __table_args__ = (Index("ix_batch_line_errors_batch_id_line", "batch_id", "line"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(256))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    param: Mapped[str | None] = mapped_column(String(255))


class IdempotencyRecord(Base):
    """A request sent with an `Idempotency-Key`: the first one's answer, replayed to the
    same key with the same body for 24 h (api/core/idempotency.py). The primary key is
    what makes racing replicas agree on one winner."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (Index("ix_idempotency_keys_expires_at", "expires_at"),)

    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # The route (method and path template) and a SHA-256 of the body it was sent with.
    route: Mapped[str] = mapped_column(String(100))
    body_hash: Mapped[str] = mapped_column(String(64))
    # NULL while the first request is still being handled.
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # What the request created (a job, file or batch id), for answers rebuilt from it.
    object_id: Mapped[str | None] = mapped_column(String(40))
    # The first request's claim lapses at this time if its process died mid-way.
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())


WEBHOOK_DUE = "delivered_at IS NULL AND failed_at IS NULL"
WEBHOOK_DONE = "delivered_at IS NOT NULL OR failed_at IS NOT NULL"


class WebhookDelivery(Base):
    """One webhook message, written in the same transaction as the state change it
    announces and retried until a 2xx (or 24 h): at least once, under a stable id."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text(WEBHOOK_DUE),
            sqlite_where=text(WEBHOOK_DUE),
        ),
        Index("ix_webhook_deliveries_object", "object_id"),
        # Delivered or given-up messages by age, for the retention sweep.
        Index(
            "ix_webhook_deliveries_done",
            "created_at",
            postgresql_where=text(WEBHOOK_DONE),
            sqlite_where=text(WEBHOOK_DONE),
        ),
    )

    # `msg_...`: sent as `webhook-id`, the same on every attempt.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"))
    url: Mapped[str] = mapped_column(Text)
    # "job" or "batch", and which event ("start", "completed", "failed", ...).
    object_kind: Mapped[str] = mapped_column(String(16))
    object_id: Mapped[str] = mapped_column(String(40))
    event: Mapped[str] = mapped_column(String(32))
    # The body, rendered at the first attempt (the object as GET returns it) and sent
    # unchanged on every retry.
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # A deliverer holds the message until then (another takes it over if it died).
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Given up (24 h of failures, or a URL the guard now refuses).
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ImageOwner(Base):
    """Which keys sent an image: images are stored once by content hash, but only a key
    that sent the image may read it back."""

    __tablename__ = "image_owners"
    __table_args__ = (Index("ix_image_owners_last_used_at", "last_used_at"),)

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Last time this key put the image in a job or a stored message: every job or message
    # of this key that refers to the image was made at or before it (the retention sweep
    # relies on that to check references cheaply).
    last_used_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now()
    )
