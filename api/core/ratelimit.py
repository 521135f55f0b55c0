"""A key's limits at the door of every route that creates work (api/core/limits.py says
what each limit is; storage/ratelimit.py how they are counted).

`admission(...)` is the one call a route makes, around the code that builds its jobs,
before anything is fetched or stored (images included):

1. `max_priority`: a request naming a priority more urgent than the key's ceiling is a
   400 naming the limit; one that names none gets the ceiling.
2. `max_queued_jobs` (synchronous routes only): a key with that many interactive jobs
   queued gets a 429 (`Retry-After: 1`); the job API (202) still accepts.
3. `requests_per_minute`, `tokens_per_minute`, `batch_lines_per_day`: one atomic take in
   Redis; short of any of them, a 429 that took nothing.

Tokens are counted before the model sees the request, so they are estimated: a prompt's
text is its UTF-8 bytes / 3 rounded up (no tokenizer in the API; real tokenizers give
3-4 bytes per token for English, fewer for other scripts, so this over-counts rather
than under-counts), plus 4 per chat message and 768 per image, plus the most the
completion may take: `max_tokens` / `max_completion_tokens`, else
`FERRY_DEFAULT_MAX_TOKENS`, else `FERRY_TPM_DEFAULT_COMPLETION_TOKENS` (1024). Each job
records its share (`Job.reserved_tokens`); when it ends, what it did not use is given
back (worker/attempt.py, and `give_back_job` for a job cancelled before it ran).

A request whose jobs are then not built (a 400, an image that cannot be fetched) gets its
whole charge back: a refused request takes nothing.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.core.errors import InvalidRequest, RateLimited
from api.core.limits import Caller, KeyLimits
from api.core.settings import ApiSettings
from api.core.state import AppState
from api.openai.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from storage.models import Job
from storage.ratelimit import Limits, Verdict, unused_tokens
from storage.repositories import jobs as jobs_repo

# The estimate's parts (module docstring).
BYTES_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 4
TOKENS_PER_IMAGE = 768
_IMAGE_TAG = re.compile(r"<img>.*?</img>", re.DOTALL)


def text_tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def _value_tokens(value: Any, key: str | None = None) -> int:
    """Every string of a message, an image part as TOKENS_PER_IMAGE (its URL or base64
    says nothing of its size in tokens)."""
    if isinstance(value, dict):
        if value.get("type") in ("image_url", "image"):
            return TOKENS_PER_IMAGE
        return sum(_value_tokens(v, k) for k, v in value.items() if k != "type")
    if isinstance(value, list):
        return sum(_value_tokens(v) for v in value)
    if isinstance(value, str) and key not in ("role", "url"):
        return text_tokens(value)
    return 0


def completion_budget(body: SamplingFields, settings: ApiSettings) -> int:
    """The most tokens one choice's completion is counted for."""
    return (
        body.requested_max_tokens
        or settings.default_max_tokens
        or settings.tpm_default_completion_tokens
    )


def chat_tokens(body: ChatCompletionRequest, settings: ApiSettings) -> list[int]:
    """Each job's reservation (one per choice): the messages, tools and completion."""
    prompt = sum(
        TOKENS_PER_MESSAGE + _value_tokens(m.model_dump(exclude_none=True)) for m in body.messages
    )
    if body.tools:
        prompt += _value_tokens([t.model_dump(exclude_none=True) for t in body.tools])
    return [prompt + completion_budget(body, settings)] * body.n


def completion_tokens(body: CompletionRequest, settings: ApiSettings) -> list[int]:
    """Each job's reservation (prompt by prompt, n choices each)."""
    budget = completion_budget(body, settings)
    per_prompt = [
        text_tokens(_IMAGE_TAG.sub("", p)) + TOKENS_PER_IMAGE * len(_IMAGE_TAG.findall(p))
        for p in body.prompts
    ]
    return [tokens + budget for tokens in per_prompt for _ in range(body.n)]


def eas_tokens(
    texts: Sequence[str],
    max_tokens: int,
    *,
    past: Sequence[dict[str, Any]] = (),
    pairs: Sequence[tuple[str, str]] = (),
    images: int = 0,
) -> list[int]:
    """An EAS turn: its prompt (and system prompt), its history (stored messages or the
    client's pairs), each a message, and its answer."""
    prompt = sum(TOKENS_PER_MESSAGE + text_tokens(t) for t in texts if t)
    prompt += sum(TOKENS_PER_MESSAGE + _value_tokens(m) for m in past)
    prompt += sum(2 * TOKENS_PER_MESSAGE + text_tokens(q) + text_tokens(a) for q, a in pairs)
    return [prompt + TOKENS_PER_IMAGE * images + max_tokens]


def reset_text(ms: int) -> str:
    """A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1s`,
    `1.5s`, `6m0s`, `1h2m3s`."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = ms / 1000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):g}s"
    if minutes or hours:
        text = f"{int(minutes)}m{text}"
    if hours:
        text = f"{int(hours)}h{text}"
    return text


def rate_headers(limits: KeyLimits, verdict: Verdict | None) -> dict[str, str]:
    """OpenAI's headers for the limits this key has (none for a limit it has not)."""
    if verdict is None:
        return {}
    headers: dict[str, str] = {}
    if limits.requests_per_minute is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        headers["x-ratelimit-remaining-requests"] = str(verdict.remaining_requests)
        headers["x-ratelimit-reset-requests"] = reset_text(verdict.reset_requests_ms)
    if limits.tokens_per_minute is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tokens_per_minute)
        headers["x-ratelimit-remaining-tokens"] = str(verdict.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = reset_text(verdict.reset_tokens_ms)
    return headers


def apply_priority(body: BaseModel, limits: KeyLimits) -> None:
    """`max_priority`: refuse a more urgent priority than the key's ceiling (0 is served
    first); a request that names none gets the ceiling."""
    ceiling = limits.max_priority
    if ceiling is None or not hasattr(body, "priority"):
        return
    if "priority" not in body.model_fields_set:
        body.priority = ceiling
        return
    asked: int = body.priority
    if asked < ceiling:
        raise InvalidRequest(
            f"priority {asked} is more urgent than this API key allows: its "
            f"max_priority is {ceiling} (0 is served first; ask for {ceiling} to 9).",
            param="priority",
            code="priority_above_limit",
        )


@dataclass
class Admission:
    """What a request was charged; `reserve` records it on the jobs it built."""

    # The key's max_priority: a job built without asking (EAS) is raised to it.
    ceiling: int | None
    tokens: list[int]
    lines: int
    charged: bool
    # OpenAI's headers for this answer (empty for a key without such limits).
    headers: dict[str, str] = field(default_factory=dict)
    used: bool = False

    def reserve(self, jobs: list[Job]) -> list[Job]:
        """Each job's share of the tokens taken (the charge is now theirs to settle)."""
        total = sum(self.tokens)
        if len(self.tokens) == len(jobs):
            shares = self.tokens
        else:  # not expected: spread the whole over the jobs
            base, extra = divmod(total, max(1, len(jobs)))
            shares = [base + (1 if i < extra else 0) for i in range(len(jobs))]
        for job, share in zip(jobs, shares, strict=False):
            job.reserved_tokens = share if self.charged else None
            if self.ceiling is not None and job.priority < self.ceiling:
                job.priority = self.ceiling
        self.used = True
        return jobs


@asynccontextmanager
async def admission(
    state: AppState,
    caller: Caller,
    *,
    tokens: Sequence[int] = (),
    lines: int = 0,
    sync: bool = False,
    body: BaseModel | None = None,
) -> AsyncIterator[Admission]:
    """Check and take the key's limits (module docstring); the block builds the request's
    jobs and hands them to `reserve`. If the block raises before that, the whole charge is
    given back."""
    limits = caller.limits
    if body is not None:
        apply_priority(body, limits)
    if sync and limits.max_queued_jobs is not None:
        await _check_queue(state, caller.id, limits.max_queued_jobs)
    wanted = list(tokens)
    checked = Limits(
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        batch_lines_per_day=limits.batch_lines_per_day if lines else None,
    )
    charged = any(
        x is not None
        for x in (
            checked.requests_per_minute,
            checked.tokens_per_minute,
            checked.batch_lines_per_day,
        )
    )
    verdict = None
    if charged:
        verdict = await state.limiter.take(caller.id, checked, tokens=sum(wanted), lines=lines)
        if not verdict.taken:
            raise _refusal(limits, verdict, sum(wanted), lines)
    taken = Admission(
        limits.max_priority,
        wanted if limits.tokens_per_minute is not None else [0] * len(wanted),
        lines if checked.batch_lines_per_day is not None else 0,
        limits.tokens_per_minute is not None,
        rate_headers(limits, verdict),
    )
    try:
        yield taken
    except BaseException:
        if charged and not taken.used:
            # Best effort: Redis failing here must not hide why the request failed.
            with anyio.CancelScope(shield=True), contextlib.suppress(RedisError):
                await state.limiter.give_back(
                    caller.id,
                    sum(taken.tokens),
                    requests=1 if checked.requests_per_minute else 0,
                    lines=taken.lines,
                )
        raise


async def _check_queue(state: AppState, owner: str, most: int) -> None:
    async with state.db.read() as session:
        queued = await jobs_repo.count_queued(session, owner, most)
    if queued >= most:
        raise RateLimited(
            f"This API key already has {queued} jobs queued, its max_queued_jobs: a "
            "synchronous request would wait behind them. Retry shortly, or submit to "
            "/v1/jobs, which queues without waiting.",
            kind="queued_jobs",
            headers={"Retry-After": "1"},
        )


def _refusal(limits: KeyLimits, verdict: Verdict, tokens: int, lines: int) -> RateLimited:
    headers = rate_headers(limits, verdict)
    retry_ms = verdict.retry_ms
    if retry_ms is None:  # can never pass as it is: say when the budget is whole again
        whole = verdict.reset_lines_ms if verdict.short == "lines" else verdict.reset_tokens_ms
        retry_ms = max(whole, verdict.reset_requests_ms, 1000)
    headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
    if verdict.short == "requests":
        message = (
            f"Rate limit reached for requests per minute: limit {limits.requests_per_minute}, "
            f"remaining {verdict.remaining_requests}. Retry in {reset_text(retry_ms)}."
        )
        return RateLimited(message, kind="requests", headers=headers)
    if verdict.short == "tokens":
        limit = limits.tokens_per_minute
        if verdict.retry_ms is None:
            message = (
                f"Request too large for tokens per minute: limit {limit}, requested {tokens} "
                "(estimated prompt + max completion). Lower max_tokens or the prompt."
            )
        else:
            message = (
                f"Rate limit reached for tokens per minute: limit {limit}, remaining "
                f"{verdict.remaining_tokens}, requested {tokens} (estimated prompt + max "
                f"completion). Retry in {reset_text(retry_ms)}."
            )
        return RateLimited(message, kind="tokens", headers=headers)
    limit = limits.batch_lines_per_day
    left = max(0, (limit or 0) - verdict.lines_used)
    message = (
        f"Batch lines per day exceeded: limit {limit}, {left} left today (UTC), this batch "
        f"has {lines}."
    )
    if verdict.retry_ms is not None:
        message += f" The count starts over in {reset_text(verdict.reset_lines_ms)}."
    return RateLimited(message, kind="batch_lines", headers=headers)


async def give_back_job(state: AppState, job: Job) -> None:
    """A job that ended without a worker (cancelled while queued): what it did not use."""
    unused = unused_tokens(job.reserved_tokens, job.prompt_tokens, job.completion_tokens)
    if unused:
        await state.limiter.give_back(job.owner_id, unused)
