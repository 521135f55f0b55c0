"""Finalisation: a batch whose jobs have all stopped gets its output and error files,
assembled from SQL (never from anything held in memory while the batch ran).

Every custom_id appears exactly once across the two files: a job per valid line (its
result, its failure, or `batch_cancelled` / `batch_expired` if it never finished) and a
stored error per invalid line. The file ids are fixed in the batch row before anything is
written, so a finalisation cut short by a crash is simply done again: the same objects are
overwritten, the file rows are added once, and the batch ends by a conditional update.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from typing import IO, Any

from sqlalchemy.engine import Row

from api.core.db import Database
from api.core.errors import error_body, job_failure
from api.openai.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Usage,
    chat_logprobs,
    completion_logprobs,
)
from api.openai.tools import reply_message
from storage.content import plain_text
from storage.models import BatchStatus, File, JobStatus
from storage.objects import ObjectStore, file_key
from storage.repositories import batch_results as batch_results_repo
from storage.repositories import batches as batches_repo
from storage.repositories import files as files_repo
from storage.stored_request import StoredRequest

_PAGE = 1000
_SPOOL_BYTES = 8 * 1024 * 1024
_NOT_FINISHED = {
    BatchStatus.CANCELLED: (
        "batch_cancelled",
        "The batch was cancelled before this request finished.",
    ),
    BatchStatus.EXPIRED: (
        "batch_expired",
        "The batch's completion window passed before this request finished.",
    ),
    BatchStatus.COMPLETED: ("request_cancelled", "This request was cancelled."),
}


async def finalize_batch(db: Database, objects: ObjectStore, batch_id: str) -> BatchStatus | None:
    """Write the files and end the batch; None if it was not (or no longer) ours to end."""
    async with db.transaction() as session:
        batch = await batches_repo.begin_finalizing(
            session, batch_id, files_repo.new_file_id(), files_repo.new_file_id()
        )
    if batch is None:
        return None
    assert batch.output_file_id is not None and batch.error_file_id is not None
    final = batch.outcome or BatchStatus.COMPLETED
    with (
        tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as out,
        tempfile.SpooledTemporaryFile(_SPOOL_BYTES) as err,
    ):
        await _write_lines(db, batch_id, final, out, err)
        written = []
        for file_id, spool, suffix in (
            (batch.output_file_id, out, "output"),
            (batch.error_file_id, err, "errors"),
        ):
            size = spool.tell()
            if size == 0:
                continue
            spool.seek(0)
            await asyncio.to_thread(
                objects.put_stream, file_key(file_id), spool, "application/jsonl"
            )
            written.append(
                File(
                    id=file_id,
                    owner_id=batch.owner_id,
                    purpose="batch_output",
                    filename=f"{batch_id}_{suffix}.jsonl",
                    bytes=size,
                    line_count=0,
                    urls=None,
                )
            )
    async with db.transaction() as session:
        for file in written:
            await files_repo.add_file_once(session, file)
        ids = {f.id for f in written}
        ended = await batches_repo.end_batch(
            session,
            batch_id,
            final,
            output_file_id=batch.output_file_id if batch.output_file_id in ids else None,
            error_file_id=batch.error_file_id if batch.error_file_id in ids else None,
        )
    return final if ended else None


async def _write_lines(
    db: Database, batch_id: str, final: BatchStatus, out: IO[bytes], err: IO[bytes]
) -> None:
    async with db.read() as session:
        after_line = 0
        while page := await batch_results_repo.line_errors_page(
            session, batch_id, after_line, _PAGE
        ):
            for e in page:
                error = {"code": e.code, "message": e.message, "param": e.param, "line": e.line}
                _write(
                    err,
                    {
                        "id": f"batch_req_line{e.line}",
                        "custom_id": e.custom_id,
                        "response": None,
                        "error": error,
                    },
                )
            after_line = page[-1].line
        after_id: str | None = None
        while rows := await batch_results_repo.job_results_page(session, batch_id, after_id, _PAGE):
            for row in rows:
                target, line = _result_line(row, final)
                _write(out if target == "output" else err, line)
            after_id = rows[-1].id


def _result_line(row: Row[Any], final: BatchStatus) -> tuple[str, dict[str, Any]]:
    base = {"id": f"batch_req_{row.id}", "custom_id": row.custom_id}
    if row.status == JobStatus.SUCCEEDED:
        response = {"status_code": 200, "request_id": row.id, "body": _body(row)}
        return "output", {**base, "response": response, "error": None}
    if row.status in (JobStatus.FAILED, JobStatus.EXPIRED):
        # 400, 500 or (past its deadline, never run) 504, as the route answers
        failure = job_failure(row.error, row.error_code)
        body = error_body(failure.message, failure.type, failure.param, failure.code)
        response = {"status_code": failure.status_code, "request_id": row.id, "body": body}
        return "errors", {
            **base,
            "response": response,
            "error": {"code": failure.code, "message": failure.message},
        }
    code, message = _NOT_FINISHED[final]
    return "errors", {**base, "response": None, "error": {"code": code, "message": message}}


def _body(row: Row[Any]) -> dict[str, Any]:
    """The response the interactive route would have given (chat or text completion)."""
    prompt, completion = row.prompt_tokens or 0, row.completion_tokens or 0
    usage = Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )
    created = int(row.created_at.timestamp())
    text = row.result_text or ""
    entries = None if row.logprobs is None else [e for d in row.logprobs for e in d]
    if row.kind == "completion":
        request = StoredRequest.load(row.request or {})
        echo = plain_text(request.prompt) if request.echo else ""
        logprobs = (
            None
            if entries is None
            else CompletionLogprobs.model_validate(completion_logprobs(entries, len(echo)))
        )
        return Completion(
            id=row.id,
            created=created,
            model=row.model,
            usage=usage,
            choices=[
                CompletionChoice(
                    index=0, text=echo + text, finish_reason=row.finish_reason, logprobs=logprobs
                )
            ],
        ).model_dump(mode="json")
    return ChatCompletion(
        id=row.id,
        created=created,
        model=row.model,
        usage=usage,
        choices=[
            ChatChoice(
                message=reply_message(row),
                finish_reason=row.finish_reason,
                logprobs=None
                if entries is None
                else ChatLogprobs.model_validate(chat_logprobs(entries)),
            )
        ],
    ).model_dump(mode="json")


def _write(target: IO[bytes], line: dict[str, Any]) -> None:
    target.write(json.dumps(line, ensure_ascii=False).encode())
    target.write(b"\n")
