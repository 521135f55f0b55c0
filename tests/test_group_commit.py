"""Claims and job ends written many to a transaction (worker/group_commit.py), on real
PostgreSQL and SQLite (file)."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.models import Job, JobStatus
from storage.repositories import api_keys, jobs
from tests.conftest import Sessions
from worker.group_commit import claim_committer, outcome_committer

pytestmark = pytest.mark.timeout(120)


async def _jobs(sessions: Sessions, n: int) -> list[Job]:
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
        made = [
            Job(
                id=jobs.new_job_id(),
                owner_id=key.id,
                model="m",
                kind="chat",
                lane="bulk",
                status=JobStatus.QUEUED,
                priority=0,
                request={"messages": [], "max_tokens": 4},
                attempts=0,
            )
            for _ in range(n)
        ]
        await jobs.insert_jobs(session, made)
    return made


def _ok(text: str) -> jobs.JobOutcome:
    return jobs.JobOutcome(JobStatus.SUCCEEDED, [text], "stop", 3, 1, None)


def _count_commits(sessions: Sessions) -> list[int]:
    bind: AsyncEngine = sessions.kw["bind"]
    commits = [0]

    def on_commit(conn: Any) -> None:
        commits[0] += 1

    event.listen(bind.sync_engine, "commit", on_commit)
    return commits


async def test_claim_jobs_takes_only_the_claimable_ones_once(sessions: Sessions) -> None:
    queued = await _jobs(sessions, 3)
    async with sessions.begin() as session:
        assert await jobs.cancel_job(session, queued[2].id) == JobStatus.QUEUED
    ids = [j.id for j in queued] + ["job_does_not_exist"]
    async with sessions.begin() as session:
        claimed = await jobs.claim_jobs(session, ids, "w1", lease_seconds=30)
    assert set(claimed) == {queued[0].id, queued[1].id}
    assert all(
        j.status == JobStatus.RUNNING and j.worker_id == "w1" and j.attempts == 1
        for j in claimed.values()
    )
    async with sessions.begin() as session:
        assert await jobs.claim_jobs(session, ids, "w2", lease_seconds=30) == {}


async def test_concurrent_claims_share_one_statement(sessions: Sessions) -> None:
    made = await _jobs(sessions, 8)
    commits = _count_commits(sessions)
    claims = claim_committer(sessions, "w1", 30)
    claims.start()
    ids = [j.id for j in made] + [made[0].id, "job_does_not_exist"]
    got = await asyncio.gather(*(claims.submit(i) for i in ids))
    await claims.stop()
    assert [j.id if j else None for j in got] == [j.id for j in made] + [None, None]
    assert commits[0] <= 2, commits  # one per claim would be 10
    assert all(j is not None and j.attempts == 1 for j in got[:8])


async def test_concurrent_ends_share_one_transaction(sessions: Sessions) -> None:
    made = await _jobs(sessions, 10)
    async with sessions.begin() as session:
        await jobs.claim_jobs(session, [j.id for j in made], "w1", lease_seconds=30)
    commits = _count_commits(sessions)
    writer = outcome_committer(sessions, "w1")
    writer.start()
    statuses = await asyncio.gather(
        *(writer.submit((j.id, _ok(f"reply {i}"))) for i, j in enumerate(made))
    )
    await writer.stop()
    assert statuses == [JobStatus.SUCCEEDED] * 10
    assert commits[0] <= 2, commits  # one per job would be 10
    async with sessions() as session:
        for i, j in enumerate(made):
            row = await jobs.get_job(session, j.id)
            assert row is not None and row.status == JobStatus.SUCCEEDED
            assert row.result_text == f"reply {i}" and row.lease_expires_at is None


async def test_a_bad_outcome_fails_alone(sessions: Sessions) -> None:
    made = await _jobs(sessions, 4)
    async with sessions.begin() as session:
        await jobs.claim_jobs(session, [j.id for j in made], "w1", lease_seconds=30)
    writer = outcome_committer(sessions, "w1")
    writer.start()
    # Deltas that cannot be stored as JSON: the grouped transaction fails, and each outcome
    # is written again on its own.
    bad = jobs.JobOutcome(JobStatus.SUCCEEDED, [object()], "stop", 3, 1, None)  # type: ignore[list-item]
    outcomes = [_ok("a"), bad, _ok("c"), _ok("d")]
    results = await asyncio.gather(
        *(writer.submit((j.id, o)) for j, o in zip(made, outcomes, strict=True)),
        return_exceptions=True,
    )
    await writer.stop()
    assert results[0] == results[2] == results[3] == JobStatus.SUCCEEDED
    assert isinstance(results[1], Exception)
    async with sessions() as session:
        rows = [await jobs.get_job(session, j.id) for j in made]
    assert [r.status if r else None for r in rows] == [
        JobStatus.SUCCEEDED,
        JobStatus.RUNNING,
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
    ]


async def test_cancelled_under_the_worker_and_lost_jobs(sessions: Sessions) -> None:
    cancelled, taken = await _jobs(sessions, 2)
    async with sessions.begin() as session:
        await jobs.claim_jobs(session, [cancelled.id], "w1", lease_seconds=30)
        await jobs.claim_jobs(session, [taken.id], "w1", lease_seconds=0.01)
    await asyncio.sleep(0.05)
    async with sessions.begin() as session:
        assert await jobs.cancel_job(session, cancelled.id) == JobStatus.RUNNING
        assert await jobs.claim_job(session, taken.id, "w2", lease_seconds=30) is not None
    writer = outcome_committer(sessions, "w1")
    writer.start()
    got = await asyncio.gather(
        writer.submit((cancelled.id, _ok("partial"))), writer.submit((taken.id, _ok("late")))
    )
    await writer.stop()
    # Cancelled under us: stays cancelled, its partial output kept; taken over: not ours.
    assert got == [JobStatus.CANCELLED, None]
    async with sessions() as session:
        row = await jobs.get_job(session, cancelled.id)
        other = await jobs.get_job(session, taken.id)
    assert row is not None and row.status == JobStatus.CANCELLED
    assert row.result_text == "partial"
    assert other is not None and other.status == JobStatus.RUNNING and other.worker_id == "w2"


async def test_submit_after_stop_is_refused(sessions: Sessions) -> None:
    writer = outcome_committer(sessions, "w1")
    writer.start()
    await writer.stop()
    with pytest.raises(RuntimeError):
        await writer.submit(("job_x", _ok("x")))
