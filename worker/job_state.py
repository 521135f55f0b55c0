"""The live state of one claimed job inside the runner (shared by attempt and publisher)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from storage.events import EventId
from storage.stored_request import StoredRequest


@dataclass
class JobAttempt:
    """The live state of one claimed job inside the runner."""

    job_id: str
    attempt: int
    request_id: str
    started_at: datetime | None = None
    # For the job metrics (storage/job_metrics.py): its model and when it was accepted.
    model: str = ""
    created_at: datetime | None = None
    deltas: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    first_token_at: datetime | None = None
    cancel_requested: bool = False
    # Text from the engine not yet turned into an event, and when its first piece came.
    pending: list[str] = field(default_factory=list)
    pending_since: float | None = None
    # With logprobs asked for: per delta its tokens' logprobs (aligned with `deltas`), and
    # those of the pending text. None otherwise (nothing is collected).
    logprobs: list[list[dict[str, Any]]] | None = None
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    # The stored request, when its reply is parsed for tool calls at the end
    # (worker/tool_calls.py); what the parser found.
    tool_request: StoredRequest | None = None
    tool_calls: list[dict[str, Any]] | None = None
    result_content: str | None = None
    # The job's key and its reserved tokens (settled when the job ends).
    owner_id: str | None = None
    reserved_tokens: int | None = None
    _seq: int = 0

    def next_id(self) -> EventId:
        self._seq += 1
        return EventId(self.attempt, self._seq)
