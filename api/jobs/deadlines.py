"""A job's deadline: when it is set (from the request or the deployment's default) and the
`Cancel-After` header that can ask for it (as Replicate's does)."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Header

from api.core.deps import StateDep
from api.core.errors import InvalidRequest
from api.core.settings import ApiSettings
from api.openai.schemas import SamplingFields
from storage.keys import Lane
from storage.models import utcnow

# Go-style durations as Replicate takes them (`30s`, `5m`, `1h30m`, `1.5h`, `250ms`), or
# a bare number of seconds.
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_BARE = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(text: str) -> float:
    """`Cancel-After`'s value in seconds; ValueError if it is not a positive duration."""
    value = text.strip()
    if _BARE.fullmatch(value):
        seconds = float(value)
    else:
        parts = list(_PART.finditer(value))
        if not parts or "".join(p.group(0) for p in parts) != value:
            raise ValueError(f"not a duration: {text!r}")
        seconds = sum(float(p.group(1)) * _SECONDS[p.group(2)] for p in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"not a positive duration: {text!r}")
    return seconds


def _cancel_after(
    state: StateDep,
    cancel_after: Annotated[
        str | None,
        Header(
            alias="Cancel-After",
            description="The job's deadline as a duration (`30s`, `5m`, `1h30m`, or plain "
            "seconds): still queued then, it ends `expired` and never runs. With "
            "`deadline_seconds` too, the earlier applies.",
            json_schema_extra={"anyOf": None, "type": "string"},
        ),
    ] = None,
) -> float | None:
    if cancel_after is None:
        return None
    try:
        seconds = parse_duration(cancel_after)
    except ValueError:
        raise InvalidRequest(
            f"Cancel-After `{cancel_after}` is not a duration: give seconds (`90`) or "
            "units `h`, `m`, `s`, `ms` (`30s`, `5m`, `1h30m`).",
            param="Cancel-After",
            code="invalid_cancel_after",
        ) from None
    _check_max(state.settings, seconds, "Cancel-After")
    return seconds


# The `Cancel-After` header, in seconds (a bad one is a 400 before the route runs).
CancelAfter = Annotated[float | None, Depends(_cancel_after)]


def with_cancel_after(
    settings: ApiSettings, body: SamplingFields, cancel_after: float | None
) -> None:
    """Fold the header into the body's `deadline_seconds` (the earlier of the two; each
    checked against the maximum on its own, so the 400 names the one too long)."""
    if cancel_after is not None:
        given = body.deadline_seconds
        if given is not None:
            _check_max(settings, given, "deadline_seconds")
        body.deadline_seconds = cancel_after if given is None else min(given, cancel_after)


def _check_max(settings: ApiSettings, seconds: float, param: str) -> None:
    if seconds > settings.max_deadline_seconds:
        raise InvalidRequest(
            f"{param}: a deadline of {seconds:g} seconds is above this server's maximum "
            f"of {settings.max_deadline_seconds:g} (FERRY_MAX_DEADLINE_SECONDS).",
            param=param,
            code="deadline_too_long",
        )


def deadline_for(
    settings: ApiSettings, body: SamplingFields, lane: Lane, now: datetime | None = None
) -> datetime | None:
    """When a job made from `body` expires if still queued: the request's deadline, else
    the lane's default (none for a batch line: its batch's window ends it). A deadline
    above FERRY_MAX_DEADLINE_SECONDS is a 400."""
    seconds = body.deadline_seconds
    if seconds is not None:
        _check_max(settings, seconds, "deadline_seconds")
    elif lane == Lane.BULK:
        return None
    else:
        seconds = settings.deadline_interactive_seconds
    return (now or utcnow()) + timedelta(seconds=seconds)
