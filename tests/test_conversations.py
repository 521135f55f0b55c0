"""Chat history in SQL: conversations continued by jobs, owned by one key, kept across
API restarts; a reply is appended only when its job succeeds."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from ferry_testing.procs import wait_until
from storage.models import Job, JobStatus
from storage.repositories import api_keys, conversations, jobs
from tests.conftest import KEY_A, TINY, Sessions, Stack, open_own_stack
from tests.helpers import assert_error, chat_body, submit, wait_job

pytestmark = pytest.mark.timeout(600)


def stored_job(database_url: str, job_id: str) -> tuple[dict[str, Any], str | None]:
    """The job's stored request and conversation id, read from SQL."""
    url = database_url.replace("postgresql+asyncpg://", "postgresql://")
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT request, conversation_id FROM jobs WHERE id = %s", (job_id,)
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def new_conversation(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/conversations", json=body or None)
    assert response.status_code == 201, response.text
    conversation: dict[str, Any] = response.json()
    return conversation


def messages_of(client: httpx.Client, conversation_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


def run_turn(client: httpx.Client, model: str, conversation_id: str, text: str) -> dict[str, Any]:
    job = submit(client, chat_body(model, text, max_tokens=12, conversation_id=conversation_id))
    final = wait_job(client, job["id"])
    assert final["status"] == "succeeded", final
    return final


def test_two_turns_second_prompt_contains_first_reply(stack: Stack) -> None:
    with stack.client() as client:
        conversation = new_conversation(client)
        assert conversation["title"] is None and conversation["default"] is False
        first = run_turn(client, TINY, conversation["id"], "Name a colour.")
        reply = first["result"]["text"]
        assert reply  # the tiny model always says something in 12 tokens
        after_one = messages_of(client, conversation["id"])
        # The second turn through the OpenAI route, with a system prompt of its own.
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": TINY,
                "max_tokens": 12,
                "conversation_id": conversation["id"],
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Another one?"},
                ],
            },
        )
        assert response.status_code == 200, response.text
        second_id = response.json()["id"]
        second_reply = response.json()["choices"][0]["message"]["content"]
        after_two = messages_of(client, conversation["id"])
        title = client.get(f"/v1/conversations/{conversation['id']}").json()["title"]

    assert [(m["role"], m["content"]) for m in after_one] == [
        ("user", "Name a colour."),
        ("assistant", reply),
    ]
    assert after_one[1]["job_id"] == first["id"] and after_one[1]["reasoning_content"] is None
    assert first["conversation_id"] == conversation["id"]
    request, linked = stored_job(stack.database_url, second_id)
    assert linked == conversation["id"]
    # System prompt first, then the stored history, then the new turn.
    assert [(m["role"], m["content"]) for m in request["messages"]] == [
        ("system", "Be brief."),
        ("user", "Name a colour."),
        ("assistant", reply),
        ("user", "Another one?"),
    ]
    assert [(m["role"], m["content"]) for m in after_two] == [
        ("user", "Name a colour."),
        ("assistant", reply),
        ("user", "Another one?"),
        ("assistant", second_reply),
    ]
    assert title == "Name a colour."


def test_failed_and_cancelled_jobs_append_nothing(stack: Stack) -> None:
    with stack.client() as client:
        conversation = new_conversation(client, title="kept clean")
        run_turn(client, TINY, conversation["id"], "Hello there.")
        before = messages_of(client, conversation["id"])
        # Prompt + 2047 new tokens cannot fit the 2048-token context: the engine fails it.
        failing = submit(
            client,
            chat_body(TINY, "This one fails.", max_tokens=2047, conversation_id=conversation["id"]),
        )
        # 1800 leaves room for the history's prompt (the reply above is up to 12 tokens): a
        # request that does not fit would fail at once and never be seen running. ignore_eos:
        # sampled, the tiny model could end on an end token before the cancel lands.
        cancelled = submit(
            client,
            chat_body(
                TINY,
                "This one is cancelled.",
                max_tokens=1800,
                ignore_eos=True,
                conversation_id=conversation["id"],
            ),
        )
        wait_until(
            lambda: client.get(f"/v1/jobs/{cancelled['id']}").json()["status"] == "running",
            30,
            "the job to start",
            interval=0.02,
        )
        assert client.post(f"/v1/jobs/{cancelled['id']}/cancel").status_code == 200
        assert wait_job(client, failing["id"])["status"] == "failed"
        assert wait_job(client, cancelled["id"])["status"] == "cancelled"
        after = messages_of(client, conversation["id"])
        # The next turn's prompt has no trace of them either.
        last = run_turn(client, TINY, conversation["id"], "Still there?")
    assert after == before
    request, _ = stored_job(stack.database_url, last["id"])
    contents = [m["content"] for m in request["messages"]]
    assert contents == [before[0]["content"], before[1]["content"], "Still there?"]


def test_delete_conversation_keeps_its_jobs(stack: Stack) -> None:
    with stack.client() as client:
        conversation = new_conversation(client)
        job = run_turn(client, TINY, conversation["id"], "Remember me.")
        deleted = client.delete(f"/v1/conversations/{conversation['id']}")
        gone = client.get(f"/v1/conversations/{conversation['id']}")
        again = client.delete(f"/v1/conversations/{conversation['id']}")
        job_after = client.get(f"/v1/jobs/{job['id']}")
        listed = [c["id"] for c in client.get("/v1/conversations?limit=100").json()["data"]]
        continuing = client.post(
            "/v1/jobs", json=chat_body(TINY, "Hi", max_tokens=4, conversation_id=conversation["id"])
        )
    assert deleted.status_code == 200
    assert deleted.json() == {
        "id": conversation["id"],
        "object": "conversation.deleted",
        "deleted": True,
    }
    assert_error(gone, 404, "not_found")
    assert_error(again, 404, "not_found")
    assert_error(continuing, 404, "not_found")
    assert conversation["id"] not in listed
    assert job_after.status_code == 200 and job_after.json()["status"] == "succeeded"
    assert job["conversation_id"] == conversation["id"]
    assert job_after.json()["conversation_id"] is None
    _, linked = stored_job(stack.database_url, job["id"])
    assert linked is None


MODEL = "tiny-history"


@pytest.fixture(scope="module")
def own_stack(model_cache: Path, logs: Path, s3_url: str) -> Iterator[Stack]:
    """One API process that the test restarts, and a transformers worker, on their own
    Redis database and SQL database."""
    with open_own_stack("ferry_test_history", 14, model_cache, s3_url) as s:
        s.add_api("history-api", logs)
        s.add_worker("history-worker", MODEL, "transformers", logs)
        yield s


def test_history_survives_an_api_restart(own_stack: Stack, logs: Path) -> None:
    with own_stack.client(KEY_A) as client:
        conversation = new_conversation(client)
        first = run_turn(client, MODEL, conversation["id"], "Before the restart.")
        before = messages_of(client, conversation["id"])
    api = own_stack.procs[0]
    api.stop()
    assert not api.alive()
    own_stack.api_urls.clear()
    own_stack.procs.remove(api)
    own_stack.add_api("history-api-2", logs)
    with own_stack.client(KEY_A) as client:
        after = messages_of(client, conversation["id"])
        listed = [c["id"] for c in client.get("/v1/conversations").json()["data"]]
        second = run_turn(client, MODEL, conversation["id"], "After the restart.")
    assert after == before
    assert [m["content"] for m in after] == ["Before the restart.", first["result"]["text"]]
    assert conversation["id"] in listed
    request, _ = stored_job(own_stack.database_url, second["id"])
    assert [m["content"] for m in request["messages"]] == [
        "Before the restart.",
        first["result"]["text"],
        "After the restart.",
    ]


# --- The repository, on PostgreSQL and SQLite -------------------------------------------


async def _owner(sessions: Sessions) -> str:
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
    return key.id


async def _running_job(sessions: Sessions, owner: str, conversation_id: str, text: str) -> str:
    job = Job(
        id=jobs.new_job_id(),
        owner_id=owner,
        model="m",
        kind="chat",
        lane="interactive",
        status=JobStatus.QUEUED,
        priority=0,
        attempts=0,
        conversation_id=conversation_id,
        request={
            "max_tokens": 4,
            "turn_start": 1,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "image": {
                                "sha256": "ab" * 32,
                                "mime": "image/png",
                                "width": 2,
                                "height": 3,
                            },
                        },
                        {"type": "text", "text": text},
                    ],
                },
            ],
        },
    )
    async with sessions.begin() as session:
        await jobs.insert_jobs(session, [job])
        assert await jobs.claim_job(session, job.id, "w1", lease_seconds=30) is not None
    return job.id


async def test_default_conversation_is_one_per_key_under_races(sessions: Sessions) -> None:
    owner = await _owner(sessions)

    async def default_id() -> str:
        async with sessions.begin() as session:
            return (await conversations.default_conversation(session, owner)).id

    ids = await asyncio.gather(*(default_id() for _ in range(8)))
    async with sessions() as session:
        listed = await conversations.list_owned(session, owner, after=None, limit=100)
    assert len(set(ids)) == 1
    assert [(c.id, c.default_for) for c in listed] == [(ids[0], owner)]


async def test_a_success_appends_its_turn_once_with_reasoning_apart(sessions: Sessions) -> None:
    owner = await _owner(sessions)
    async with sessions.begin() as session:
        conversation = await conversations.create(session, owner)
    job_id = await _running_job(sessions, owner, conversation.id, "What is this?")
    done = jobs.JobOutcome(
        JobStatus.SUCCEEDED, ["<think>A square", ".</think>", "A dot."], "stop", 9, 3, None
    )
    async with sessions.begin() as session:
        assert await jobs.finish_job(session, job_id, "w1", done)
        assert not await jobs.finish_job(session, job_id, "w1", done)  # already final
    async with sessions() as session:
        stored = await conversations.messages_of(session, conversation.id)
        tokens = await conversations.reply_tokens(session, stored)
        row = await conversations.get_owned(session, conversation.id, owner)
    assert [(m.role, m.content, m.reasoning, m.job_id) for m in stored] == [
        ("user", "What is this?", None, job_id),
        ("assistant", "A dot.", "A square.", job_id),
    ]
    assert stored[0].images == [{"sha256": "ab" * 32, "mime": "image/png", "width": 2, "height": 3}]
    assert tokens == {job_id: 3}
    assert row is not None and row.title == "What is this?"


async def test_failed_cancelled_and_orphaned_jobs_append_nothing(sessions: Sessions) -> None:
    owner = await _owner(sessions)
    async with sessions.begin() as session:
        conversation = await conversations.create(session, owner)
    failed = await _running_job(sessions, owner, conversation.id, "fails")
    cancelled = await _running_job(sessions, owner, conversation.id, "cancelled")
    orphan = await _running_job(sessions, owner, conversation.id, "orphan")
    async with sessions.begin() as session:
        await jobs.finish_job(
            session,
            failed,
            "w1",
            jobs.JobOutcome(JobStatus.FAILED, [], None, None, 0, None, error="boom"),
        )
        await jobs.cancel_job(session, cancelled)
        await jobs.finish_job(
            session,
            cancelled,
            "w1",
            jobs.JobOutcome(JobStatus.CANCELLED, ["part"], "abort", 2, 1, None),
        )
    async with sessions() as session:
        assert await conversations.messages_of(session, conversation.id) == []
    # Deleted while its last job ran: the success still lands, into nothing.
    async with sessions.begin() as session:
        assert await conversations.delete_owned(session, conversation.id, owner)
    async with sessions.begin() as session:
        assert await jobs.finish_job(
            session, orphan, "w1", jobs.JobOutcome(JobStatus.SUCCEEDED, ["ok"], "stop", 2, 1, None)
        )
        row = await jobs.get_job(session, orphan)
        assert await conversations.messages_of(session, conversation.id) == []
    assert row is not None and row.status == JobStatus.SUCCEEDED and row.conversation_id is None


async def test_clear_keeps_the_conversation_and_owner_checks(sessions: Sessions) -> None:
    owner, other = await _owner(sessions), await _owner(sessions)
    async with sessions.begin() as session:
        conversation = await conversations.default_conversation(session, owner)
        await conversations.append(
            session,
            conversation.id,
            [conversations.NewMessage("user", "hi"), conversations.NewMessage("assistant", "yo")],
        )
    async with sessions.begin() as session:
        assert await conversations.get_owned(session, conversation.id, other) is None
        assert not await conversations.delete_owned(session, conversation.id, other)
        assert len(await conversations.messages_of(session, conversation.id)) == 2
        await conversations.clear(session, conversation.id)
    async with sessions() as session:
        again = await conversations.find_default(session, owner)
        assert again is not None and again.id == conversation.id
        assert await conversations.messages_of(session, conversation.id) == []
