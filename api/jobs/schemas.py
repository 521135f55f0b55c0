"""Wire types of the jobs API: submit, poll, list."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.core.pages import CursorPage
from api.openai.schemas import (
    ChatCompletionRequest,
    ChatLogprobs,
    ToolCall,
    Usage,
    chat_logprobs,
)
from api.openai.tools import reply_message
from storage.keys import Lane
from storage.models import Job, JobStatus
from storage.telemetry import trace_id_of

# Which of a job's states its webhook announces (Replicate's names); all by default.
JobWebhookEvent = Literal["start", "completed"]


class JobCreate(ChatCompletionRequest):
    """An OpenAI chat-completions request (with `priority` and `metadata`), run
    asynchronously."""

    webhook: str | None = Field(
        None,
        max_length=2048,
        description="An https URL that gets the job (as `GET /v1/jobs/{id}` shows it), "
        "signed per Standard Webhooks, when it starts and when it completes",
    )
    webhook_events_filter: list[JobWebhookEvent] | None = Field(
        None,
        min_length=1,
        description="Which events the webhook gets: `start`, `completed` (default both)",
    )


class JobResult(BaseModel):
    text: str
    finish_reason: str | None
    # The model's thinking (`<think>…</think>`), split out of `text` as in chat answers.
    reasoning_content: str | None = None
    # With logprobs asked for: each output token's (OpenAI's chat shape).
    logprobs: ChatLogprobs | None = None
    # The tools the reply calls (a request with `tools`; found by the model's tool-call
    # parser): `text` is then the rest of the reply, as chat answers' `content`.
    tool_calls: list[ToolCall] | None = None


class JobError(BaseModel):
    message: str
    # "invalid_request": the request's fault (the engine refused it); "server_error":
    # Ferry's (chat and completions answer these 400 and 500); "expired": still queued
    # at its deadline, never run (504).
    code: str = "server_error"


class JobTimings(BaseModel):
    queue_seconds: float | None = Field(description="created -> started (final attempt)")
    ttft_seconds: float | None = Field(description="started -> first token")
    total_seconds: float | None = Field(description="created -> finished")


class JobDeleted(BaseModel):
    id: str
    object: Literal["job.deleted"] = "job.deleted"
    deleted: bool = True


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    priority: int
    created_at: float
    started_at: float | None
    first_token_at: float | None
    finished_at: float | None
    attempts: int
    result: JobResult | None
    usage: Usage | None
    error: JobError | None
    metadata: dict[str, Any] | None
    # The conversation the job continues (null once that conversation is deleted).
    conversation_id: str | None = None
    # `bulk` for a batch line, which also names its batch and custom_id.
    lane: Lane = Lane.INTERACTIVE
    batch_id: str | None = None
    custom_id: str | None = None
    timings: JobTimings
    # Still queued at this time (Unix seconds), the job ends `expired` and never runs
    # (null: none, as for a batch line, which its batch's window ends).
    deadline_at: float | None = None
    # Its webhook (null: none) and the events it gets (null: all).
    webhook: str | None = None
    webhook_events_filter: list[str] | None = None
    trace_id: str | None = Field(
        None, description="The job's OpenTelemetry trace id (null when tracing is off)"
    )

    @classmethod
    def from_row(cls, job: Job) -> JobPublic:
        done = job.status == JobStatus.SUCCEEDED or job.result_text is not None
        usage = None
        if job.completion_tokens is not None:
            prompt = job.prompt_tokens or 0
            usage = Usage(
                prompt_tokens=prompt,
                completion_tokens=job.completion_tokens,
                total_tokens=prompt + job.completion_tokens,
            )
        return cls(
            id=job.id,
            model=job.model,
            status=job.status,
            priority=job.priority,
            created_at=job.created_at.timestamp(),
            started_at=_ts(job.started_at),
            first_token_at=_ts(job.first_token_at),
            finished_at=_ts(job.finished_at),
            attempts=job.attempts,
            result=_result(job) if done else None,
            usage=usage,
            error=JobError(message=job.error, code=job.error_code or "server_error")
            if job.error
            else None,
            metadata=job.metadata_,
            conversation_id=job.conversation_id,
            lane=job.lane,
            batch_id=job.batch_id,
            custom_id=job.custom_id,
            timings=JobTimings(
                queue_seconds=_between(job.created_at, job.started_at),
                ttft_seconds=job.ttft_ms / 1000 if job.ttft_ms is not None else None,
                total_seconds=_between(job.created_at, job.finished_at),
            ),
            deadline_at=_ts(job.deadline_at),
            webhook=job.webhook_url,
            webhook_events_filter=job.webhook_events,
            trace_id=trace_id_of(job.traceparent),
        )


class JobList(CursorPage[JobPublic]):
    pass


def _result(job: Job) -> JobResult:
    logprobs = None
    if job.logprobs is not None:
        logprobs = ChatLogprobs.model_validate(
            chat_logprobs([e for delta in job.logprobs for e in delta])
        )
    message = reply_message(job)
    return JobResult(
        text=message.content or "",
        finish_reason=job.finish_reason,
        reasoning_content=message.reasoning_content,
        logprobs=logprobs,
        tool_calls=message.tool_calls or None,
    )


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 6)
