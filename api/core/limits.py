"""A key's limits: each optional, a field left out takes the deployment's default
(FERRY_DEFAULT_<FIELD>; unset there too: no limit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Ceilings that catch a typo (an extra zero or three), not a policy.
_MAX_RATE = 100_000_000


class KeyLimits(BaseModel):
    """What one key may do. Sent to and shown by `/v1/admin/keys`, stored as JSON on the
    key's row."""

    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(
        None, ge=1, le=_MAX_RATE, description="Requests that create work, per minute."
    )
    tokens_per_minute: int | None = Field(
        None,
        ge=1,
        le=_MAX_RATE,
        description="Prompt + max completion tokens per minute, settled with the real "
        "usage when each job ends.",
    )
    batch_lines_per_day: int | None = Field(
        None, ge=1, le=_MAX_RATE, description="Batch input lines accepted per day."
    )
    max_concurrent_jobs: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="Jobs of this key running at once; more wait their turn (queued).",
    )
    max_queued_jobs: int | None = Field(
        None,
        ge=0,
        le=10_000_000,
        description="Jobs of this key waiting for a slot, beyond which synchronous routes "
        "answer 429.",
    )
    max_priority: int | None = Field(
        None,
        ge=0,
        le=9,
        description="The most urgent priority this key may ask for (0 is served first, 9 "
        "last): a request asking for a smaller number is refused.",
    )
    weight: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="This key's share of the workers when several keys have work queued "
        "(2 gets twice the share of 1).",
    )

    def over(self, defaults: KeyLimits) -> KeyLimits:
        """These limits, each unset one taken from `defaults`."""
        own = self.model_dump(exclude_none=True)
        return KeyLimits.model_validate({**defaults.model_dump(exclude_none=True), **own})


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is making the request: the key's id and its effective limits."""

    id: str
    limits: KeyLimits
    name: str | None = None


def stored_limits(value: dict[str, Any] | None) -> KeyLimits:
    """Limits as stored on a key's row (validated when written)."""
    return KeyLimits.model_validate(value or {})
