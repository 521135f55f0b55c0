"""How accepted jobs become Celery messages (api/jobs/enqueue.py): interactive jobs one per
message unless a burst arrives together, batch lines several to a message, never mixing
models, lanes or priorities (a message goes to one queue at one priority); every message
the one task with a list of job ids; and the thread that sends them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from api.jobs.enqueue import BULK_LINES_PER_MESSAGE, JobQueue, QueuedJob, _messages, create_producer
from storage.keys import PENDING_JOBS, queue_name
from tests.conftest import REDIS_BASE
from tests.helpers import sent_job_ids


def test_batch_lines_share_messages_by_model_and_priority() -> None:
    n = BULK_LINES_PER_MESSAGE
    bulk_a = [QueuedJob(f"a{i}", "m1", "bulk", 0) for i in range(n + 3)]
    bulk_b = [QueuedJob(f"b{i}", "m2", "bulk", 0) for i in range(2)]
    bulk_c = [QueuedJob(f"c{i}", "m1", "bulk", 5) for i in range(1)]
    interactive = [QueuedJob(f"i{i}", "m1", "interactive", 0) for i in range(3)]
    jobs = [*interactive[:1], *bulk_a[:4], *bulk_b, *interactive[1:], *bulk_c, *bulk_a[4:]]

    messages = _messages(jobs)

    singles = [ids for ids, first in messages if first.lane == "interactive"]
    assert singles == [["i0"], ["i1"], ["i2"]]
    grouped = [(ids, first) for ids, first in messages if first.lane == "bulk"]
    assert [ids for ids, _ in grouped] == [
        [f"a{i}" for i in range(n)],
        [f"a{i}" for i in range(n, n + 3)],
        ["b0", "b1"],
        ["c0"],
    ]
    for ids, first in grouped:
        # Every line of a message has the model and priority the message is sent with.
        members = [j for j in jobs if j.id in ids]
        assert {(j.model, j.priority, j.lane) for j in members} == {
            (first.model, first.priority, "bulk")
        }
    sent = [i for ids, _ in messages for i in ids]
    assert sorted(sent) == sorted(j.id for j in jobs)  # each job exactly once


@pytest.mark.parametrize(
    ("n", "messages", "largest"),
    [
        (1, 1, 1),
        (8, 8, 1),
        (9, 8, 2),
        (64, 8, 8),
        (65, 9, 8),
        (100, 13, 8),
    ],
)
def test_interactive_bursts_spread_over_at_least_eight_messages(
    n: int, messages: int, largest: int
) -> None:
    jobs = [QueuedJob(f"j{i}", "m1", "interactive", 0) for i in range(n)]
    out = _messages(jobs)
    ids = [group for group, _ in out]
    assert len(out) == messages
    assert max(len(group) for group in ids) == largest
    assert max(map(len, ids)) - min(map(len, ids)) <= 1  # evenly spread
    assert [i for group in ids for i in group] == [j.id for j in jobs]  # in order, once


def test_interactive_jobs_of_other_models_or_priorities_never_share_a_message() -> None:
    jobs = [QueuedJob(f"a{i}", "m1", "interactive", 0) for i in range(20)]
    jobs += [QueuedJob(f"b{i}", "m2", "interactive", 0) for i in range(20)]
    jobs += [QueuedJob(f"c{i}", "m1", "interactive", 3) for i in range(20)]
    for group, first in _messages(jobs):
        members = [j for j in jobs if j.id in group]
        assert {(j.model, j.priority) for j in members} == {(first.model, first.priority)}


# -- the sender thread (JobQueue), against a real Redis broker ---------------------------

QUEUE_REDIS_URL = f"{REDIS_BASE}/7"  # no test stack uses db 7


@pytest.fixture
def broker() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(QUEUE_REDIS_URL)
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()


async def test_messages_go_out_while_the_event_loop_is_busy(broker: redis.Redis) -> None:
    queue = JobQueue(create_producer(QUEUE_REDIS_URL), QUEUE_REDIS_URL)
    queue.start()
    try:
        jobs = [QueuedJob(f"j{i}", "m1", "interactive", 0) for i in range(12)]
        queue.enqueue(jobs)
        # Block this event loop on purpose (as a burst of requests would keep it busy):
        # the sender needs nothing from it.
        deadline = time.monotonic() + 20
        while (
            len(sent_job_ids(broker, queue_name("m1", "interactive"))) < len(jobs)
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)  # noqa: ASYNC251 (the point of the test)
        assert sorted(sent_job_ids(broker, queue_name("m1", "interactive"))) == sorted(
            j.id for j in jobs
        )
        # Each job was marked pending (for the reconciler) before its message went out.
        assert all(broker.zscore(PENDING_JOBS, j.id) is not None for j in jobs)
    finally:
        await queue.stop()


async def test_send_now_waits_for_its_messages_and_stop_sends_what_is_left(
    broker: redis.Redis,
) -> None:
    queue = JobQueue(create_producer(QUEUE_REDIS_URL), QUEUE_REDIS_URL)
    queue.start()
    await queue.send_now([QueuedJob("b1", "m1", "bulk", 3), QueuedJob("b2", "m1", "bulk", 3)])
    assert sorted(sent_job_ids(broker, queue_name("m1", "bulk"))) == ["b1", "b2"]

    queue.enqueue([QueuedJob("late", "m1", "interactive", 0)])
    await queue.stop()
    assert sent_job_ids(broker, queue_name("m1", "interactive")) == ["late"]


async def test_a_send_that_fails_raises_to_send_now_and_the_sender_lives_on() -> None:
    # Nothing listens on port 1 of loopback: every send fails at once.
    unreachable = "redis://127.0.0.1:1/0"
    queue = JobQueue(create_producer(unreachable), unreachable)
    queue.start()
    try:
        queue.enqueue([QueuedJob("x", "m1", "interactive", 0)])  # logged, not raised
        for _ in range(2):
            with pytest.raises(redis.ConnectionError):
                await queue.send_now([QueuedJob("y", "m1", "interactive", 0)])
    finally:
        await queue.stop()
