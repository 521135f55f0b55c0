"""`Job.request` as one typed model (storage/stored_request.py): checked when written,
every row written so far still reads, on PostgreSQL and SQLite."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from pydantic import ValidationError

from storage.models import Job, JobStatus
from storage.repositories import api_keys, jobs
from storage.stored_request import CURRENT_VERSION, StoredRequest
from tests.conftest import Sessions
from worker.attempt import Failure, _stored_request, generation_request
from worker.engines.base import SamplingOptions

pytestmark = pytest.mark.timeout(120)

IMAGE = {"sha256": "ab" * 32, "mime": "image/png", "width": 2, "height": 2}


def _chat() -> StoredRequest:
    return StoredRequest(
        model="m",
        max_tokens=16,
        temperature=0.5,
        stop=["\n"],
        seed=7,
        logit_bias={"42": -100.0},
        logprobs=2,
        structured_output={"json_object": True},
        messages=[
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": IMAGE},
                    {"type": "text", "text": "What is it?"},
                ],
            },
        ],
        turn_start=1,
        reasoning="parser",
        chat_template_kwargs={"enable_thinking": True},
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="auto",
        parallel_tool_calls=False,
    )


def test_a_request_round_trips_through_its_json() -> None:
    request = _chat()
    stored = request.dump()
    assert stored["version"] == CURRENT_VERSION
    assert StoredRequest.load(stored) == request


def test_fields_left_at_their_default_are_not_stored() -> None:
    """The shape rows had before the model: only what a request sets, plus the version."""
    stored = StoredRequest(model="m", prompt="Hi", max_tokens=4).dump()
    assert stored == {"version": 1, "model": "m", "prompt": "Hi", "max_tokens": 4}
    assert StoredRequest(prompt="Hi", echo=True, ignore_eos=True).dump() == {
        "version": 1,
        "prompt": "Hi",
        "echo": True,
        "ignore_eos": True,
    }


def test_a_row_from_before_the_version_loads_as_version_1() -> None:
    old: dict[str, Any] = {
        "model": "m",
        "max_tokens": 8,
        "temperature": 1,
        "seed": 3,
        "messages": [{"role": "user", "content": "Hi"}],
        # rows from before `reasoning` say `thinking`
        "thinking": True,
        # and a key this code does not know (a newer writer's) is ignored
        "something_new": {"x": 1},
    }
    request = StoredRequest.load(old)
    assert request.version == 1
    assert request.reasoning == "tagged"
    assert request.temperature == 1.0 and request.max_tokens == 8
    assert request.messages == [{"role": "user", "content": "Hi"}]
    assert not request.ignore_eos and request.parallel_tool_calls
    assert request.parses_tool_calls is False
    # `reasoning`, when the row has it, wins over the old flag
    assert StoredRequest.load({**old, "reasoning": "parser"}).reasoning == "parser"
    assert StoredRequest.load({**old, "thinking": False}).reasoning is None


def test_parses_tool_calls_unless_tool_choice_is_none() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert StoredRequest.load({"tools": tools}).parses_tool_calls
    assert StoredRequest(tools=tools, tool_choice="auto").parses_tool_calls
    assert not StoredRequest(tools=tools, tool_choice="none").parses_tool_calls
    assert not StoredRequest(tools=[], tool_choice="auto").parses_tool_calls


def test_a_bad_write_raises() -> None:
    with pytest.raises(ValidationError):
        StoredRequest(max_tokens="many")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        StoredRequest(max_tokns=4)  # type: ignore[call-arg]  # a typo: unknown field
    with pytest.raises(ValidationError):
        StoredRequest(reasoning="maybe")  # type: ignore[arg-type]
    request = StoredRequest(prompt="Hi")
    with pytest.raises(ValidationError):
        request.turn_start = "first"  # type: ignore[assignment]
    with pytest.raises(ValidationError):
        StoredRequest.load({"messages": "not a list"})


def test_a_row_that_does_not_read_fails_its_job_instead_of_retrying() -> None:
    job = Job(id="j", model="m", kind="chat", request={"max_tokens": "many", "messages": []})
    read = _stored_request(job)
    assert isinstance(read, Failure) and read.code == "server_error"
    assert "max_tokens" in read.message


async def test_the_worker_maps_an_old_row_as_before() -> None:
    job = Job(
        id="j",
        model="m",
        kind="chat",
        lane="interactive",
        priority=0,
        request={
            "model": "m",
            "max_tokens": 8,
            "stop": "END",
            "min_tokens": 2,
            "logit_bias": {"5": 1},
            "messages": [{"role": "user", "content": "Hi"}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    )
    body = _stored_request(job)
    assert isinstance(body, StoredRequest)
    request = await generation_request(job, body, "j:1", 10, None)  # type: ignore[arg-type]
    assert request.messages == [{"role": "user", "content": "Hi"}]
    assert request.chat_template_kwargs == {"enable_thinking": False}
    assert request.sampling == SamplingOptions(
        max_tokens=8, stop=("END",), min_tokens=2, logit_bias={5: 1.0}
    )


async def test_rows_written_and_old_rows_read_back_from_sql(sessions: Sessions) -> None:
    old: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    written = _chat()
    async with sessions.begin() as session:
        (key,) = await api_keys.ensure_keys(session, [f"sk-{secrets.token_hex(4)}"])
        rows = [
            Job(
                id=jobs.new_job_id(),
                owner_id=key.id,
                model="m",
                kind="chat",
                lane="interactive",
                status=JobStatus.QUEUED,
                priority=0,
                request=request,
                attempts=0,
            )
            for request in (written.dump(), old)
        ]
        await jobs.insert_jobs(session, rows)
    async with sessions() as session:
        new_row, old_row = [await jobs.get_job(session, row.id) for row in rows]
    assert new_row is not None and old_row is not None
    assert StoredRequest.load(new_row.request) == written
    loaded = StoredRequest.load(old_row.request)
    assert loaded.version == 1 and loaded.max_tokens == 4 and loaded.messages == old["messages"]
