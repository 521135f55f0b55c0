"""OpenAI Files API for batches: upload JSONL inputs, read and delete files."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from api.batches.schemas import FileDeleted, FileList, FilePublic
from api.batches.upload import scan_jsonl
from api.core.deps import CurrentKey, SessionDep, StateDep
from api.core.errors import InvalidRequest, NotFound, error_responses
from api.core.idempotency import IdempotentCreate
from api.core.idempotency import responses as idempotent_responses
from api.core.pages import NO_NUL, After, split_page
from storage.models import File as FileRow
from storage.objects import ObjectNotFound, file_key
from storage.repositories import files as files_repo

router = APIRouter(prefix="/v1/files", tags=["files"])


@router.post(
    "",
    response_model=FilePublic,
    responses={**error_responses(400, 401, 413), **idempotent_responses(200)},
)
async def upload_file(
    file: Annotated[UploadFile, File(description="JSONL, one request per line")],
    # Checked below (400 `invalid_purpose`); the document states the one value.
    purpose: Annotated[str, Form(description="`batch`", json_schema_extra={"enum": ["batch"]})],
    key: CurrentKey,
    state: StateDep,
    session: SessionDep,
    idempotency: IdempotentCreate,
) -> FilePublic:
    """Upload a batch input file (multipart, `purpose=batch`).

    Each line is `{"custom_id", "method": "POST", "url", "body"}` with url
    `/v1/chat/completions` or `/v1/completions`. The file is refused (400, or 413 when too
    large) if it is empty, not JSONL, or over the limits (`FERRY_BATCH_MAX_LINES` lines,
    `FERRY_BATCH_MAX_FILE_BYTES` bytes); lines are checked one by one when a batch runs.
    """
    if purpose != "batch":
        raise InvalidRequest(
            f"purpose `{purpose}` is not supported; upload batch input files with purpose `batch`.",
            param="purpose",
            code="invalid_purpose",
        )
    settings = state.settings
    summary = await asyncio.to_thread(
        scan_jsonl,
        file.file,
        max_bytes=settings.batch_max_file_bytes,
        max_lines=settings.batch_max_lines,
        max_line_bytes=settings.max_request_bytes,
    )
    file.file.seek(0)
    row = FileRow(
        id=files_repo.new_file_id(),
        owner_id=key,
        purpose="batch",
        filename=(file.filename or "input.jsonl")[:255],
        bytes=summary.bytes,
        line_count=summary.lines,
        urls=summary.urls,
    )
    object_key = file_key(row.id)
    await asyncio.to_thread(state.objects.put_stream, object_key, file.file, "application/jsonl")
    try:
        await files_repo.add_file(session, row)
        await session.commit()
    except BaseException:
        # Nothing half-created: no row, so no object either.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(state.objects.delete, object_key)
        raise
    public = FilePublic.from_row(row)
    await idempotency.record(200, public, row.id)
    return public


@router.get("", response_model=FileList, responses=error_responses(400, 401))
async def list_files(
    key: CurrentKey,
    session: SessionDep,
    purpose: Annotated[str | None, Query(pattern=NO_NUL)] = None,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """This key's files (inputs and batch outputs), newest first unless `order=asc`."""
    rows = await files_repo.list_owned_files(
        session, key, purpose=purpose, after=after, limit=limit + 1, newest_first=order == "desc"
    )
    page, has_more = split_page(rows, limit)
    return FileList.of(page, [FilePublic.from_row(f) for f in page], has_more)


async def _owned(session: SessionDep, key: CurrentKey, file_id: str) -> FileRow:
    row = await files_repo.get_owned_file(session, file_id, key)
    if row is None:
        raise NotFound(f"No file with id `{file_id}`.", param="file_id")
    return row


@router.get("/{file_id}", response_model=FilePublic, responses=error_responses(401, 404))
async def get_file(file_id: str, key: CurrentKey, session: SessionDep) -> FilePublic:
    """One file's description."""
    return FilePublic.from_row(await _owned(session, key, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file's bytes",
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 404),
    },
)
async def get_file_content(
    file_id: str, key: CurrentKey, session: SessionDep, state: StateDep
) -> StreamingResponse:
    """The file's bytes (JSONL), streamed from the object store."""
    row = await _owned(session, key, file_id)
    try:
        chunks = await asyncio.to_thread(state.objects.iter_chunks, file_key(row.id))
    except ObjectNotFound:
        raise NotFound(f"The content of file `{file_id}` is gone.", param="file_id") from None
    return StreamingResponse(
        chunks, media_type="application/jsonl", headers={"Content-Length": str(row.bytes)}
    )


@router.delete("/{file_id}", response_model=FileDeleted, responses=error_responses(401, 404))
async def delete_file(
    file_id: str, key: CurrentKey, session: SessionDep, state: StateDep
) -> FileDeleted:
    """Delete a file: its row, then its bytes. A batch already created from it keeps
    running only if it has been expanded; one still validating fails."""
    row = await _owned(session, key, file_id)
    await files_repo.delete_file(session, row.id)
    await session.commit()
    await asyncio.to_thread(state.objects.delete, file_key(row.id))
    return FileDeleted(id=row.id, deleted=True)
