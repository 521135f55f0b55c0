"""A batch input file, line by line: splitting without holding the file, and turning each
line into a job or into an error with its line number.

Lines are checked with the same wire types and the same job builders as the interactive
routes (`ChatCompletionRequest` + `build_chat_job`, `CompletionRequest` +
`build_completion_jobs`), so a batch line accepts exactly what the API accepts, images
included, and is refused with the same messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.core import ratelimit
from api.core.errors import FerryError
from api.core.limits import KeyLimits, stored_limits
from api.core.nul import NUL_MESSAGE, find_nul, has_nul_escape
from api.core.state import AppState
from api.jobs import service as jobs_service
from api.openai.schemas import ChatCompletionRequest, CompletionRequest
from storage.keys import Lane
from storage.models import Job
from storage.repositories import api_keys as api_keys_repo

MAX_CUSTOM_ID = 256


@dataclass(frozen=True, slots=True)
class RawLine:
    number: int  # 1-based, counting blank lines too (what an editor shows)
    data: bytes | None  # None: longer than the line limit (its bytes were skipped)


def split_lines(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[RawLine]:
    """Non-blank lines of a byte stream. A line longer than `max_line_bytes` is yielded as
    `data=None` and never buffered whole, so memory stays bounded by the limit."""
    number = 0
    pending = bytearray()
    too_long = False
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not too_long:
                pending += piece
                if len(pending) > max_line_bytes:
                    too_long = True
                    pending.clear()
            if end < 0:
                break
            number += 1
            if too_long or pending.strip():
                yield RawLine(number, None if too_long else bytes(pending))
            pending.clear()
            too_long = False
            start = end + 1
    if too_long or pending.strip():
        yield RawLine(number + 1, None if too_long else bytes(pending))


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str
    param: str | None = None

    def row(self, batch_id: str) -> dict[str, Any]:
        return {
            "batch_id": batch_id,
            "line": self.line,
            "custom_id": self.custom_id,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }

    def as_batch_error(self) -> dict[str, Any]:
        """OpenAI's BatchError shape (`errors.data`, and the `error` of error-file lines)."""
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


class LineChecker:
    """Checks one batch's lines in order; remembers custom_ids to refuse repeats."""

    def __init__(self, state: AppState, owner_id: str, endpoint: str, id_prefix: str) -> None:
        self._state = state
        self._owner_id = owner_id
        self._endpoint = endpoint
        self._id_prefix = id_prefix
        self._seen: set[str] = set()
        self._limits: KeyLimits | None = None

    async def _key_limits(self) -> KeyLimits:
        """The owner's effective limits, read once per batch (its lines' max_priority)."""
        if self._limits is None:
            async with self._state.db.read() as session:
                key = await api_keys_repo.get_key(session, self._owner_id)
            own = stored_limits(key.limits if key is not None else None)
            self._limits = own.over(self._state.settings.default_limits())
        return self._limits

    async def check(self, raw: RawLine) -> Job | LineError:
        n = raw.number
        if raw.data is None:
            return LineError(
                n, None, "line_too_long", f"Line {n} is longer than the largest request accepted."
            )
        try:
            obj = json.loads(raw.data)
        except ValueError as exc:
            return LineError(n, None, "invalid_json", f"Line {n} is not valid JSON: {exc}.")
        if not isinstance(obj, dict):
            return LineError(
                n,
                None,
                "invalid_line",
                f"Line {n} must be a JSON object with `custom_id`, `method`, `url` and `body`.",
            )
        # The byte scan first: walking every line's values would cost each line.
        where = find_nul(obj) if has_nul_escape(raw.data) else None
        if where is not None:
            return LineError(n, None, "invalid_line", f"Line {n}: `{where}` {NUL_MESSAGE}.", where)
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return LineError(
                n,
                None,
                "missing_custom_id",
                f"Line {n} has no `custom_id` (a non-empty string).",
                "custom_id",
            )
        if len(custom_id) > MAX_CUSTOM_ID:
            return LineError(
                n,
                None,
                "invalid_custom_id",
                f"Line {n}: `custom_id` is longer than {MAX_CUSTOM_ID} characters.",
                "custom_id",
            )
        if custom_id in self._seen:
            return LineError(
                n,
                custom_id,
                "duplicate_custom_id",
                f"Line {n} repeats custom_id `{custom_id}` of an earlier line.",
                "custom_id",
            )
        self._seen.add(custom_id)
        problem = self._envelope_problem(n, obj)
        if problem is not None:
            code, message, param = problem
            return LineError(n, custom_id, code, message, param)
        try:
            job = await self._build(obj["body"])
        except ValidationError as exc:
            message, param = _first_error(exc)
            return LineError(n, custom_id, "invalid_body", f"Line {n}: {message}", param)
        except FerryError as exc:
            param = f"body.{exc.param}" if exc.param else "body"
            return LineError(
                n, custom_id, exc.code or "invalid_request", f"Line {n}: {exc.message}", param
            )
        job.id = f"{self._id_prefix}{n:06x}"
        job.custom_id = custom_id
        return job

    def _envelope_problem(self, n: int, obj: dict[str, Any]) -> tuple[str, str, str] | None:
        method, url, body = obj.get("method"), obj.get("url"), obj.get("body")
        if method != "POST":
            return (
                "invalid_method",
                f'Line {n}: `method` must be "POST", not {json.dumps(method)}.',
                "method",
            )
        if url != self._endpoint:
            return (
                "url_mismatch",
                f"Line {n} calls {json.dumps(url)}, but this batch's "
                f"endpoint is `{self._endpoint}`.",
                "url",
            )
        if not isinstance(body, dict):
            return ("invalid_body", f"Line {n}: `body` must be a JSON object.", "body")
        if body.get("stream"):
            return (
                "invalid_body",
                f"Line {n}: `stream` is not supported in a batch.",
                "body.stream",
            )
        return None

    async def _build(self, body: dict[str, Any]) -> Job:
        state, owner = self._state, self._owner_id
        if self._endpoint == "/v1/chat/completions":
            chat = ChatCompletionRequest.model_validate(body)
            ratelimit.apply_priority(chat, await self._key_limits())
            return await jobs_service.build_chat_job(state, owner, chat, lane=Lane.BULK)
        completion = CompletionRequest.model_validate(body)
        ratelimit.apply_priority(completion, await self._key_limits())
        if len(completion.prompts) != 1:
            raise FerryError(
                "a batch line takes one prompt (one line per prompt).",
                param="prompt",
                code="invalid_body",
            )
        jobs = await jobs_service.build_completion_jobs(state, owner, completion, lane=Lane.BULK)
        return jobs[0]


def _first_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if "[" not in str(p) and "-" not in str(p)]
    param = ".".join(["body", *loc])
    return f"{param}: {first.get('msg', 'invalid')}", param
