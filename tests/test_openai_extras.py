"""OpenAI-compatible extras on the job path: /v1/completions, response_format through vLLM
structured outputs (and a 400 where the engine cannot), and thinking -> reasoning_content.

The official `openai` SDK is the client wherever it can be, as users would call Ferry."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY_A, TINY, Stack
from tests.helpers import assert_error


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)


# --- /v1/completions -------------------------------------------------------------------


def test_completion_non_streaming(stack: Stack) -> None:
    out = sdk(stack).completions.create(
        model=TINY, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert out.object == "text_completion"
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].text
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage is not None and out.usage.completion_tokens >= 1
    # The completion is a job: the same text is on it.
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{out.id}").json()
    assert job["status"] == "succeeded"
    assert job["result"]["text"] == out.choices[0].text


def test_completion_prompt_list_gives_one_choice_per_prompt(stack: Stack) -> None:
    prompts = ["The cat", "A long road", "Numbers:"]
    out = sdk(stack).completions.create(model=TINY, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    singles = [
        sdk(stack)
        .completions.create(model=TINY, prompt=p, max_tokens=6, temperature=0)
        .choices[0]
        .text
        for p in prompts
    ]
    # Greedy: each choice is what its prompt gives alone, in the prompt's position.
    assert [c.text for c in out.choices] == singles
    assert out.usage is not None
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_a_burst_of_jobs_shares_messages_and_every_job_answers(stack: Stack) -> None:
    """12 prompts in one request are 12 jobs sent together: api/jobs/enqueue.py spreads them
    over 8 Celery messages, some carrying two jobs. Each job still gets its own answer, in
    its prompt's place."""
    prompts = [f"Item {i}:" for i in range(12)]
    out = sdk(stack).completions.create(model=TINY, prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == list(range(12))
    assert all(c.finish_reason in ("stop", "length") for c in out.choices)
    for i in (0, 1, 11):  # 0 and 1 share a message; 11 travels alone
        alone = sdk(stack).completions.create(
            model=TINY, prompt=prompts[i], max_tokens=5, temperature=0
        )
        assert out.choices[i].text == alone.choices[0].text
    worker_logs = "".join(
        p.log_path.read_text(errors="replace") for p in stack.procs if p.name == "worker-vllm"
    )
    # worker/tasks.py logs each message's job ids, comma-separated.
    assert re.search(r"worker\.tasks jobs \S+,\S+: ", worker_logs), (
        "no Celery message carried several jobs"
    )


def test_completion_streaming_interleaves_prompts_and_ends_with_usage(stack: Stack) -> None:
    prompts = ["Hello there", "Goodbye now"]
    stream = sdk(stack).completions.create(
        model=TINY,
        prompt=prompts,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts = ["", ""]
    finish: dict[int, str | None] = {}
    chunks = list(stream)
    for c in chunks[:-1]:
        for choice in c.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert set(finish) == {0, 1}
    whole = sdk(stack).completions.create(model=TINY, prompt=prompts, max_tokens=8, temperature=0)
    assert texts == [c.text for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_completion_echo_returns_the_prompt_first(stack: Stack) -> None:
    out = sdk(stack).completions.create(
        model=TINY, prompt="Echo me", max_tokens=4, temperature=0, echo=True
    )
    plain = sdk(stack).completions.create(model=TINY, prompt="Echo me", max_tokens=4, temperature=0)
    assert out.choices[0].text == "Echo me" + plain.choices[0].text


# --- response_format -------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}},
    "required": ["ok", "level"],
    "additionalProperties": False,
}


def test_json_schema_output_follows_the_schema(stack: Stack) -> None:
    out = sdk(stack).chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        max_tokens=48,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA},
        },
    )
    content = out.choices[0].message.content
    assert content is not None
    assert out.choices[0].finish_reason == "stop", content  # the grammar closed the object
    value = json.loads(content)
    assert isinstance(value["ok"], bool) and value["level"] in ("low", "high")
    assert set(value) == {"ok", "level"}


def test_json_object_output_is_json(stack: Stack) -> None:
    out = sdk(stack).chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Reply with a JSON object."}],
        max_tokens=64,
        temperature=0,
        response_format={"type": "json_object"},
    )
    content = out.choices[0].message.content
    assert content is not None
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut off by max_tokens: still a JSON object's prefix, never free text
        assert content.lstrip().startswith("{")


def test_response_format_on_an_engine_without_structured_outputs_is_400(
    stack: Stack, hf_model: str
) -> None:
    with stack.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": hf_model,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
            },
        )
    error = assert_error(response, 400, code="unsupported_response_format")
    assert error["param"] == "response_format"
    # Without response_format the same model answers.
    with stack.client() as client:
        response = client.post(
            "/v1/chat/completions",
            json={
                "model": hf_model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            },
        )
    assert response.status_code == 200, response.text


# --- thinking / reasoning_content ------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        {"chat_template_kwargs": {"enable_thinking": True}},
        {"metadata": {"enable_thinking": True}},  # FastDeploy's way
    ],
)
def test_thinking_answers_carry_reasoning_content(stack: Stack, flags: dict[str, Any]) -> None:
    body = {
        "model": TINY,
        "messages": [{"role": "user", "content": "Think first."}],
        "max_tokens": 12,
        "temperature": 0,
        **flags,
    }
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        job = client.get(f"/v1/jobs/{response.json()['id']}").json()
    assert "reasoning_content" in message
    # The split is the one split_reasoning makes of the job's whole output.
    raw = (job["result"]["reasoning_content"], job["result"]["text"])
    assert (message["reasoning_content"], message["content"]) == raw
    # Streamed, the same split arrives in pieces.
    stream = sdk(stack).chat.completions.create(
        model=TINY,
        messages=body["messages"],
        max_tokens=12,
        temperature=0,
        stream=True,
        metadata=flags.get("metadata"),
        extra_body={k: v for k, v in flags.items() if k != "metadata"},
    )
    reasoning = content = ""
    for c in stream:
        if c.choices:
            delta: Any = c.choices[0].delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
    assert (reasoning or None, content) == raw


def test_thinking_off_leaves_think_tags_in_content(stack: Stack) -> None:
    with httpx.Client(
        base_url=stack.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60
    ) as client:
        response = client.post(
            "/v1/chat/completions",
            json={"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )
    assert response.json()["choices"][0]["message"]["reasoning_content"] is None
