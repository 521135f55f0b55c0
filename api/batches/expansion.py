"""Expansion: a validating batch's input file becomes one job per valid line, and one
stored error per invalid line, in ONE transaction that also moves the batch to
`in_progress` (or `failed` when no line is valid).

So an expansion either happened whole or not at all: an API process that dies halfway
leaves the batch `validating` with nothing stored, and once its lease lapses another
process (the supervisor) expands it again. The unique (batch_id, custom_id) index is the
last guard: two expansions of one batch can never both store their jobs. Jobs go in
multi-row INSERTs of 1,000, so a 50,000-line file never sits in memory as rows whole; the
file itself is read from the object store in chunks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

from api.batches.lines import LineChecker, LineError, RawLine, split_lines
from api.core.state import AppState
from storage.job_metrics import record_jobs_created
from storage.models import Batch, BatchStatus, File, Job
from storage.objects import ObjectNotFound, file_key
from storage.repositories import batch_results as batch_results_repo
from storage.repositories import batches as batches_repo
from storage.repositories import jobs as jobs_repo

log = logging.getLogger(__name__)
_INSERT_ROWS = 1000
# errors.data of a batch that failed because no line was valid keeps this many.
_MAX_ERRORS_SHOWN = 100


class _Superseded(Exception):
    """The batch left `validating` meanwhile (cancelled, expired): store nothing."""


async def expand_batch(state: AppState, batch_id: str) -> None:
    """Expand a batch this process holds the expansion lease of."""
    async with state.db.read() as session:
        batch = await batches_repo.get_batch(session, batch_id)
        file = await session.get(File, batch.input_file_id) if batch else None
    if batch is None or batch.status != BatchStatus.VALIDATING:
        return
    if file is None:
        await _fail(
            state,
            batch_id,
            "input_file_missing",
            f"The input file `{batch.input_file_id}` was deleted before the batch ran.",
        )
        return
    holding = asyncio.create_task(_hold(state, batch_id), name=f"hold-{batch_id}")
    try:
        await _store_lines(state, batch)
    except _Superseded:
        log.info("batch %s left validating during its expansion; nothing stored", batch_id)
    except ObjectNotFound:
        await _fail(
            state,
            batch_id,
            "input_file_missing",
            f"The input file `{batch.input_file_id}` is gone from the object store.",
        )
    finally:
        holding.cancel()


async def _hold(state: AppState, batch_id: str) -> None:
    """Renew the expansion lease while it runs: only a dead process's batch is taken over."""
    lease = state.settings.batch_expand_lease_seconds
    while True:
        await asyncio.sleep(lease / 3)
        try:
            async with state.db.transaction() as session:
                await batches_repo.extend_expansion(session, batch_id, lease)
        except Exception:
            log.warning("could not renew the expansion lease of batch %s", batch_id)


async def _store_lines(state: AppState, batch: Batch) -> None:
    checker = LineChecker(state, batch.owner_id, batch.endpoint, batches_repo.batch_job_id_prefix())
    jobs: list[Job] = []
    errors: list[LineError] = []
    shown: list[dict[str, Any]] = []
    total = invalid = 0
    models: set[str] = set()
    per_model: Counter[str] = Counter()
    async with state.db.transaction() as session:
        async for raw in _input_lines(state, batch.input_file_id):
            total += 1
            result = await checker.check(raw)
            if isinstance(result, LineError):
                invalid += 1
                errors.append(result)
                if len(shown) < _MAX_ERRORS_SHOWN:
                    shown.append(result.as_batch_error())
            else:
                result.batch_id = batch.id
                models.add(result.model)
                per_model[result.model] += 1
                jobs.append(result)
            if len(jobs) >= _INSERT_ROWS:
                await jobs_repo.insert_jobs(session, jobs)
                jobs.clear()
            if len(errors) >= _INSERT_ROWS:
                await batch_results_repo.insert_line_errors(
                    session, [e.row(batch.id) for e in errors]
                )
                errors.clear()
        await jobs_repo.insert_jobs(session, jobs)
        await batch_results_repo.insert_line_errors(session, [e.row(batch.id) for e in errors])
        if total == invalid:
            if invalid > len(shown):
                shown.append(
                    {
                        "code": "more_errors",
                        "message": f"{invalid - len(shown)} more "
                        "invalid lines are not listed here.",
                        "param": None,
                        "line": None,
                    }
                )
            if not shown:
                shown.append(
                    {
                        "code": "empty_file",
                        "message": "The input file has no lines.",
                        "param": None,
                        "line": None,
                    }
                )
            moved = await batches_repo.fail_batch(
                session, batch.id, shown, total=total, invalid=invalid
            )
        else:
            model = next(iter(models)) if len(models) == 1 else None
            moved = await batches_repo.start_batch(
                session, batch.id, total=total, invalid=invalid, model=model
            )
        if not moved:
            raise _Superseded  # rolls the whole transaction back
    try:
        await record_jobs_created(state.redis, per_model)
    except Exception:
        log.warning("batch %s: could not count its jobs", batch.id, exc_info=True)
    log.info("batch %s: %d lines, %d invalid", batch.id, total, invalid)


async def _input_lines(state: AppState, file_id: str) -> AsyncIterator[RawLine]:
    """The file's lines, read from the object store on a thread, chunk by chunk."""
    chunks: Iterator[bytes] = await asyncio.to_thread(state.objects.iter_chunks, file_key(file_id))
    lines = split_lines(chunks, state.settings.max_request_bytes)
    batch: list[RawLine] = []
    while True:
        # A few hundred lines per hop to the thread: reading S3 never blocks the loop.
        batch = await asyncio.to_thread(_take, lines, 500)
        if not batch:
            return
        for raw in batch:
            yield raw


def _take(lines: Iterator[RawLine], n: int) -> list[RawLine]:
    out = []
    for raw in lines:
        out.append(raw)
        if len(out) >= n:
            break
    return out


async def _fail(state: AppState, batch_id: str, code: str, message: str) -> None:
    async with state.db.transaction() as session:
        await batches_repo.fail_batch(
            session,
            batch_id,
            [{"code": code, "message": message, "param": "input_file_id", "line": None}],
        )
