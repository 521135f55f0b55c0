"""Wire types of OpenAI's Files and Batches APIs, as the `openai` SDK reads them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from api.core.pages import CursorPage
from storage.models import Batch, BatchStatus, File
from storage.repositories.batch_jobs import BatchProgress

# What a batch line's `url` (and a batch's `endpoint`) may name.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None

    @classmethod
    def from_row(cls, file: File) -> FilePublic:
        return cls(
            id=file.id,
            bytes=file.bytes,
            created_at=_ts(file.created_at),
            filename=file.filename,
            purpose=file.purpose,
        )


class FileList(CursorPage[FilePublic]):
    pass


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


BatchWebhookEvent = Literal["completed", "failed", "expired", "cancelled"]


class BatchCreate(BaseModel):
    input_file_id: str = Field(
        min_length=1, max_length=64, json_schema_extra={"pattern": "^[^\\u0000]*$"}
    )
    # Checked by the service (400 `unsupported_endpoint`); the document states the values.
    endpoint: str = Field(
        description="`/v1/chat/completions` or `/v1/completions`",
        json_schema_extra={"enum": list(ENDPOINTS)},
    )
    completion_window: str = Field(
        "24h",
        description="How long the batch may take: `24h` (OpenAI's one value) or any "
        "`<n>s`, `<n>m`, `<n>h`, `<n>d` up to the server's limit (a Ferry extension)",
        json_schema_extra={"pattern": "^[1-9][0-9]{0,6}[smhd]$"},
    )
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs")
    # Ferry extension: a signed webhook when the batch ends (see Webhooks in docs/api.md).
    webhook: str | None = Field(
        None,
        max_length=2048,
        description="An https URL that gets the batch (as `GET /v1/batches/{id}` shows "
        "it), signed per Standard Webhooks, when it ends (a Ferry extension)",
    )
    webhook_events_filter: list[BatchWebhookEvent] | None = Field(
        None,
        min_length=1,
        description="Which ends the webhook gets: `completed`, `failed`, `expired`, "
        "`cancelled` (default all)",
    )

    @field_validator("input_file_id")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        # SQL text cannot hold NUL: without this the lookup fails with a 500.
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return value
        if len(value) > 16:
            raise ValueError("at most 16 keys")
        if any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("keys are at most 64 characters, values at most 512")
        return value


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class BatchPublic(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    usage: BatchUsage
    metadata: dict[str, Any] | None
    # Ferry extension: its webhook (null: none) and the events it gets (null: all).
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None

    @classmethod
    def from_row(cls, batch: Batch, progress: BatchProgress | None) -> BatchPublic:
        p = progress or BatchProgress()
        ended = batch.status.is_terminal
        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            model=batch.model,
            errors=BatchErrors(data=[BatchError(**e) for e in batch.errors])
            if batch.errors
            else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            # Chosen when finalizing starts, but only there to read once the batch ended.
            output_file_id=batch.output_file_id if ended else None,
            error_file_id=batch.error_file_id if ended else None,
            created_at=_ts(batch.created_at),
            in_progress_at=_opt_ts(batch.in_progress_at),
            expires_at=_opt_ts(batch.expires_at),
            finalizing_at=_opt_ts(batch.finalizing_at),
            completed_at=_opt_ts(batch.completed_at),
            failed_at=_opt_ts(batch.failed_at),
            expired_at=_opt_ts(batch.expired_at),
            cancelling_at=_opt_ts(batch.cancelling_at),
            cancelled_at=_opt_ts(batch.cancelled_at),
            request_counts=BatchRequestCounts(
                total=batch.request_total,
                completed=p.succeeded,
                failed=p.failed + batch.invalid_count,
            ),
            usage=BatchUsage(
                input_tokens=p.prompt_tokens,
                output_tokens=p.completion_tokens,
                total_tokens=p.prompt_tokens + p.completion_tokens,
            ),
            metadata=batch.metadata_,
            webhook=batch.webhook_url,
            webhook_events_filter=batch.webhook_events,
        )


class BatchList(CursorPage[BatchPublic]):
    pass


def _ts(value: datetime) -> int:
    return int(value.timestamp())


def _opt_ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())
