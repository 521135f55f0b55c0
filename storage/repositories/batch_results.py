"""What each line of a batch came to, for its output and error files: its job's result,
or the error that kept the line from becoming a job."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import BatchLineError, Job


async def insert_line_errors(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of {batch_id, line, custom_id, code, message, param}, in one statement."""
    if rows:
        await session.execute(insert(BatchLineError), list(rows))


RESULT_COLUMNS = (
    Job.id,
    Job.custom_id,
    Job.kind,
    Job.model,
    Job.status,
    Job.request,
    Job.result_text,
    Job.finish_reason,
    Job.prompt_tokens,
    Job.completion_tokens,
    Job.error,
    Job.error_code,
    Job.logprobs,
    Job.tool_calls,
    Job.result_content,
    Job.created_at,
)


async def job_results_page(
    session: AsyncSession, batch_id: str, after_id: str | None, limit: int
) -> list[Row[Any]]:
    """One page of the batch's jobs in input order (keyset: id > after_id)."""
    query = select(*RESULT_COLUMNS).where(Job.batch_id == batch_id)
    if after_id is not None:
        query = query.where(Job.id > after_id)
    return list((await session.execute(query.order_by(Job.id).limit(limit))).all())


async def line_errors_page(
    session: AsyncSession, batch_id: str, after_line: int, limit: int
) -> list[BatchLineError]:
    query = (
        select(BatchLineError)
        .where(BatchLineError.batch_id == batch_id, BatchLineError.line > after_line)
        .order_by(BatchLineError.line)
        .limit(limit)
    )
    return list((await session.scalars(query)).all())
