"""`Idempotency-Key` on the routes that create work (`POST /v1/jobs`,
`/v1/chat/completions`, `/v1/completions`, `/v1/batches`, `/v1/files`), as Stripe's.

The same API key sending the same key with the same body to the same route within
`idempotency_ttl_seconds` (24 h) gets the first request's answer, with
`Idempotent-Replayed: true`; nothing new is created. Another body (or another route) with
that key is a 409. Keys are per API key: another key's identical key is unrelated.

How racing replicas agree (storage/repositories/idempotency.py): the first request inserts
the record (primary key (owner, key), INSERT ... ON CONFLICT DO NOTHING) in a short
transaction of its own, holding it for `idempotency_lease_seconds`; it creates its object
and stores its answer. A request that finds the record waits (polling, up to
`idempotency_wait_seconds`, then a 409 to retry) for that answer and replays it. A record
past its expiry, or whose holder's lease lapsed without an answer (its process died), counts
as absent and is taken over.

What is stored: only success. A request that fails before creating anything (a 4xx such
as an unknown model, a 429, a 5xx) drops its claim, so the corrected retry (or the same one,
later) runs; Stripe stores 4xx answers too, but a stored refusal would make a client that
fixes nothing but a limit or a model wait 24 h for a fresh key. Once the object exists
the answer is stored, whatever happens next (a synchronous completion that then times out
is replayed by waiting for the same job again).

The body's identity: JSON bodies hash canonically (keys sorted, no whitespace), so a client
re-serialising the same request matches; a multipart upload hashes its fields and its
files' bytes, not its boundary (which differs on every send).

Replays: jobs, files and batches replay the stored JSON answer and status, without running
the route (so a replay costs no rate limit, and creates nothing). Chat and completions store
their jobs' ids; the route then answers from those jobs as it answered the first time:
waiting for them and rendering the completion, or streaming their events from the start.
Those jobs are not cancelled when a client with a key leaves or times out (`keeps_jobs`):
the retry after a dropped connection is what the key is for.

Expired records are replaced when their key is reused; `delete_expired` removes them in
bounded batches for a periodic cleanup (left to the retention sweep, issue 17).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.datastructures import UploadFile

from api.core.db import Database
from api.core.deps import CurrentKey, StateDep
from api.core.errors import Answered, Conflict, InvalidRequest, error_responses
from storage.models import IdempotencyRecord, Job, utcnow
from storage.repositories import idempotency as records

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
# Printable ASCII: what clients put there (UUIDs, random strings), and what a header can
# carry unchanged through proxies.
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))

# The header as the OpenAPI document states it (checked here, with a message of its own).
_KEY_SCHEMA = {
    "anyOf": None,
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_KEY_LENGTH,
    "pattern": "^[!-~]([ -~]*[!-~])?$",
}


def responses(
    success: int, headers: dict[str, Any] | None = None
) -> dict[int | str, dict[str, Any]]:
    """What an idempotent route adds to its OpenAPI `responses`: the replay header (and the
    route's own `headers`) on its success, and its 409."""
    conflict = error_responses(409)[409]
    conflict = {
        **conflict,
        "description": f"`{HEADER}` already used with another body or route, or its first "
        "request is still being handled (retry)",
    }
    header = {
        REPLAYED: {
            "description": f"`true` when this is the stored answer to an earlier request "
            f"with the same `{HEADER}`",
            "schema": {"type": "string", "enum": ["true"]},
        }
    }
    return {success: {"headers": {**(headers or {}), **header}}, 409: conflict}


@dataclass
class Idempotency:
    """A request's `Idempotency-Key`, claimed by this request (or absent: every method is
    then a no-op). `replayed_jobs` is set on a chat/completions replay."""

    db: Database | None = None
    owner_id: str = ""
    key: str = ""
    lease: datetime | None = None
    replayed_jobs: list[Job] | None = None
    settled: bool = field(default=False)

    @property
    def keeps_jobs(self) -> bool:
        """A client that sent a key retries with it: its jobs go on when it leaves (or its
        wait times out), for the retry to find them running, not cancelled."""
        return self.db is not None or self.replayed_jobs is not None

    @property
    def headers(self) -> dict[str, str]:
        """The answer's extra headers."""
        return {REPLAYED: "true"} if self.replayed_jobs is not None else {}

    async def record(self, status: int, body: BaseModel, object_id: str | None) -> None:
        """Store the answer the route is about to send (it has created its object)."""
        await self._store(status, body.model_dump(mode="json", by_alias=True), object_id)

    async def record_jobs(self, jobs: Sequence[Job]) -> None:
        """Store the jobs a chat or completions request created (replayed from them)."""
        await self._store(200, {"job_ids": [j.id for j in jobs]}, jobs[0].id if jobs else None)

    async def _store(self, status: int, body: dict[str, Any], object_id: str | None) -> None:
        if self.db is None or self.lease is None or self.settled:
            return
        async with self.db.transaction() as session:
            await records.record_answer(
                session,
                self.owner_id,
                self.key,
                locked_until=self.lease,
                status=status,
                body=body,
                object_id=object_id,
            )
        self.settled = True

    async def release(self) -> None:
        """The request created nothing: free the key for a retry."""
        if self.db is None or self.lease is None or self.settled:
            return
        self.settled = True
        async with self.db.transaction() as session:
            await records.release(session, self.owner_id, self.key, self.lease)


def check_key(raw: str) -> str:
    """The header's value, or a 400 naming it."""
    if not raw:
        raise InvalidRequest(f"{HEADER} is empty.", param=HEADER, code="invalid_idempotency_key")
    if len(raw) > MAX_KEY_LENGTH:
        raise InvalidRequest(
            f"{HEADER} is {len(raw)} characters long; it may have at most {MAX_KEY_LENGTH}.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    if not _PRINTABLE.issuperset(raw):
        raise InvalidRequest(
            f"{HEADER} may only contain printable ASCII characters.",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return raw


async def body_hash(request: Request) -> str | None:
    """SHA-256 of what the body says (None: the body is not a JSON object, the route will
    refuse it, and nothing is claimed)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _form_hash(request)
    try:
        parsed = json.loads(await request.body())
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _form_hash(request: Request) -> str:
    digest = hashlib.sha256()
    form = await request.form()  # parsed already by FastAPI (cached on the request)
    for name, value in sorted(form.multi_items(), key=lambda item: item[0]):
        if isinstance(value, UploadFile):
            content = await asyncio.to_thread(_file_hash, value.file)
            part = ["file", name, value.filename or "", content]
        else:
            part = ["field", name, value]
        digest.update(json.dumps(part).encode() + b"\n")
    return digest.hexdigest()


def _file_hash(source: IO[bytes]) -> str:
    digest = hashlib.sha256()
    source.seek(0)
    while chunk := source.read(1024 * 1024):
        digest.update(chunk)
    source.seek(0)
    return digest.hexdigest()


def route_of(request: Request) -> str:
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"[:100]


async def claim(
    db: Database,
    owner_id: str,
    key: str,
    route: str,
    digest: str,
    *,
    ttl: float,
    lease: float,
    wait: float,
) -> tuple[datetime | None, IdempotencyRecord | None]:
    """Claim the key for this request ((its lease, None)) or find the first request's
    answer to replay ((None, record)); 409 for another body or route, or when the first
    request is still running after `wait` seconds."""
    deadline = time.monotonic() + wait
    delay = 0.02
    while True:
        now = utcnow()
        times = {
            "now": now,
            "locked_until": now + timedelta(seconds=lease),
            "expires_at": now + timedelta(seconds=ttl),
        }
        async with db.transaction() as session:
            if await records.insert_claim(
                session, owner_id, key, route=route, body_hash=digest, **times
            ):
                return times["locked_until"], None
            found = await records.get_record(session, owner_id, key)
            if found is None:
                continue  # released between the two statements: try again
            lapsed = found.response_status is None and (
                found.locked_until is None or found.locked_until <= now
            )
            if found.expires_at <= now or lapsed:
                if await records.take_over(
                    session, owner_id, key, route=route, body_hash=digest, **times
                ):
                    return times["locked_until"], None
                continue
        if found.route != route:
            raise Conflict(
                f"This {HEADER} was used with `{found.route}`; use a new key for `{route}`.",
                param=HEADER,
                code="idempotency_key_reused",
            )
        if found.body_hash != digest:
            raise Conflict(
                f"This {HEADER} was used with another request body; a new request needs a new key.",
                param=HEADER,
                code="idempotency_key_reused",
            )
        if found.response_status is not None:
            return None, found
        if time.monotonic() >= deadline:
            raise Conflict(
                f"The first request with this {HEADER} is still being handled; retry later.",
                param=HEADER,
                code="idempotency_key_in_use",
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


def _dependency(replays_jobs: bool) -> Any:
    async def idempotency(
        request: Request,
        state: StateDep,
        owner_id: CurrentKey,
        header: Annotated[
            str | None,
            Header(
                alias=HEADER,
                description="Any string (a UUID, say) up to 255 printable characters: a "
                "retry with the same key and body gets the first answer, nothing is "
                "created twice (24 h, per API key).",
                json_schema_extra=_KEY_SCHEMA,
            ),
        ] = None,
    ) -> AsyncIterator[Idempotency]:
        if header is None:
            yield Idempotency()
            return
        key = check_key(header)
        digest = await body_hash(request)
        if digest is None:
            yield Idempotency()
            return
        settings = state.settings
        lease, found = await claim(
            state.db,
            owner_id,
            key,
            route_of(request),
            digest,
            ttl=settings.idempotency_ttl_seconds,
            lease=settings.idempotency_lease_seconds,
            wait=settings.idempotency_wait_seconds,
        )
        if found is not None:
            yield await _replay(state.db, found, replays_jobs)
            return
        handle = Idempotency(state.db, owner_id, key, lease)
        try:
            yield handle
        finally:
            # Not recorded: the route failed before creating anything (or created nothing).
            await asyncio.shield(handle.release())

    return idempotency


async def _replay(db: Database, found: IdempotencyRecord, replays_jobs: bool) -> Idempotency:
    body = found.response_body or {}
    if not replays_jobs:
        assert found.response_status is not None
        raise Answered(JSONResponse(body, found.response_status, headers={REPLAYED: "true"}))
    ids = [str(i) for i in body.get("job_ids", [])]
    async with db.read() as session:
        jobs = await records.jobs_of(session, ids)
    if not ids or len(jobs) != len(ids):
        raise Conflict(
            f"The jobs of the first request with this {HEADER} no longer exist; send the "
            "request with a new key.",
            param=HEADER,
            code="idempotency_key_reused",
        )
    return Idempotency(replayed_jobs=jobs, settled=True)


# For routes whose answer is stored whole (jobs, files, batches): a replay never reaches
# the route. Function scope: the claim is released when the route raises, before the error
# answer is sent.
IdempotentCreate = Annotated[Idempotency, Depends(_dependency(False), scope="function")]
# For chat and completions: a replay reaches the route with `replayed_jobs` set.
IdempotentJobs = Annotated[Idempotency, Depends(_dependency(True), scope="function")]
