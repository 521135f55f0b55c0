"""Losing a worker or Redis loses no accepted job; queued and cancelled jobs behave.

These tests run their own deployment (own Redis database, one API process) with
transformers-engine workers that they start, kill and restart themselves, under a model
name no other test's worker serves.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from api.jobs.enqueue import create_producer
from ferry_testing.procs import wait_until
from storage.broker import priority_lists
from storage.keys import LEGACY_RUN_BULK_JOBS_TASK, LEGACY_RUN_JOB_TASK, PENDING_JOBS, queue_name
from tests.conftest import Stack, open_own_stack
from tests.helpers import chat_body, read_events, submit, text_of, wait_job

pytestmark = pytest.mark.timeout(900)
MODEL = "tiny-recovery"


@pytest.fixture(scope="module")
def own_stack(model_cache: Path, logs: Path, s3_url: str) -> Iterator[Stack]:
    with open_own_stack("ferry_test_recovery", 12, model_cache, s3_url) as s:
        s.add_api("recovery-api", logs)
        yield s


def test_queued_job_cancelled_never_runs(own_stack: Stack, logs: Path) -> None:
    # A worker announces the model, then stops: jobs now wait in the queue.
    own_stack.add_worker("recovery-w0", MODEL, "transformers", logs).stop()
    with own_stack.client() as client:
        doomed = submit(client, chat_body(MODEL, max_tokens=8))
        kept = submit(client, chat_body(MODEL, max_tokens=8))
        response = client.post(f"/v1/jobs/{doomed['id']}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        events = read_events(client, doomed["id"])
        assert [(e.id, e.type) for e in events] == [("0-1", "cancelled")]
        own_stack.add_worker("recovery-w1", MODEL, "transformers", logs)
        assert wait_job(client, kept["id"])["status"] == "succeeded"
        final = client.get(f"/v1/jobs/{doomed['id']}").json()
    assert final["status"] == "cancelled"
    assert final["attempts"] == 0 and final["started_at"] is None and final["result"] is None
    own_stack.procs.pop().stop()


def test_worker_killed_mid_job_is_redelivered_and_completes(own_stack: Stack, logs: Path) -> None:
    first = own_stack.add_worker("recovery-w2", MODEL, "transformers", logs)
    with own_stack.client() as client:
        job = submit(client, chat_body(MODEL, max_tokens=400, temperature=0, ignore_eos=True))
        head = read_events(client, job["id"], limit=1)
        assert [e.type for e in head] == ["delta"]
        first.kill()
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        own_stack.add_worker("recovery-w3", MODEL, "transformers", logs)
        final = wait_job(client, job["id"], timeout=300)
        events = read_events(client, job["id"])
        resumed = read_events(client, job["id"], last_event_id=head[-1].id)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 2
    # The full stream: what attempt 1 sent before it died, then attempt 2 from the start.
    retry_at = [e.type for e in events].index("retry")
    assert events[retry_at].id == "2-1"
    assert all(e.order[0] == 1 and e.type == "delta" for e in events[:retry_at])
    assert all(e.order[0] == 2 for e in events[retry_at:])
    assert text_of(events) == final["result"]["text"]
    # A client that saw attempt 1's first deltas gets the rest of attempt 1, is told to
    # start over, then gets attempt 2: exactly the events after its Last-Event-ID.
    assert [e.id for e in resumed] == [e.id for e in events if e.order > head[-1].order]
    assert "retry" in [e.type for e in resumed]
    assert text_of(head + resumed) == final["result"]["text"]
    own_stack.procs.pop().stop()


def test_redis_flushed_after_accept_reconciler_reruns_job(own_stack: Stack, logs: Path) -> None:
    with own_stack.client() as client:
        job = submit(client, chat_body(MODEL, max_tokens=8))
        redis = own_stack.redis()
        wait_until(lambda: redis.llen(f"{MODEL}.interactive") == 1, 10, "the message")
        # Everything Redis held is gone: the Celery message, the pending mark, the registry.
        own_stack.redis().flushdb()
        own_stack.add_worker("recovery-w4", MODEL, "transformers", logs)
        final = wait_job(client, job["id"], timeout=120)
    assert final["status"] == "succeeded", final
    assert final["attempts"] == 1
    url = own_stack.database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT enqueued_at FROM jobs WHERE id = %s", (job["id"],)).fetchone()
    assert row is not None and row[0] is not None  # the reconciler sent it again
    own_stack.procs.pop().stop()


def test_messages_an_older_api_queued_still_run(own_stack: Stack, logs: Path) -> None:
    """A rolling upgrade: jobs whose messages an older API queued under the legacy task
    names (`ferry.run_job` with one id, `ferry.run_bulk_jobs` with a list) run to
    completion on a new worker."""
    own_stack.add_worker("recovery-w5", MODEL, "transformers", logs).stop()  # the model is known
    interactive = queue_name(MODEL, "interactive")
    with own_stack.client() as client:
        one = submit(client, chat_body(MODEL, max_tokens=8))
        listed = submit(client, chat_body(MODEL, max_tokens=8))
        redis = own_stack.redis()
        wait_until(
            lambda: sum(redis.llen(q) for q in priority_lists(interactive)) == 2, 10, "the messages"
        )
        # Marks far ahead: the reconciler must not send these jobs again under the new name.
        later = time.time() + 3600
        redis.zadd(PENDING_JOBS, {one["id"]: later, listed["id"]: later})
        redis.delete(*priority_lists(interactive))
        # What an older API sent for the same jobs (a bulk message on the bulk queue).
        producer = create_producer(own_stack.redis_url)
        sent = [
            producer.send_task(LEGACY_RUN_JOB_TASK, args=[one["id"]], queue=interactive),
            producer.send_task(
                LEGACY_RUN_BULK_JOBS_TASK, args=[[listed["id"]]], queue=queue_name(MODEL, "bulk")
            ),
        ]
        own_stack.add_worker("recovery-w6", MODEL, "transformers", logs)
        finals = [wait_job(client, job["id"], timeout=120) for job in (one, listed)]
    assert [(f["status"], f["attempts"]) for f in finals] == [("succeeded", 1)] * 2, finals
    worker = own_stack.procs.pop()
    worker.stop()
    worker_log = worker.log_path.read_text(errors="replace")
    # Each legacy message ran its job itself (a job it found claimed would be `skipped`).
    assert re.search(rf"ferry\.run_job\[{sent[0].id}\] succeeded in \S+ 'succeeded'", worker_log), (
        worker_log[-3000:]
    )
    assert re.search(
        rf"ferry\.run_bulk_jobs\[{sent[1].id}\] succeeded in \S+ \['succeeded'\]", worker_log
    ), worker_log[-3000:]
