"""`tools` / `tool_choice` end to end: a worker with `--tool-call-parser hermes` serves the
tiny model built for tool calls (tests/tool_model.py): its template renders tools, and one
token of its vocabulary is a whole Hermes tool call, which `logit_bias` forces the model
to emit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import KEY_A, TINY, Stack
from tests.helpers import assert_error
from tests.tool_model import HISTORY, WEATHER_TOOL, tool_token_id

TOOLS_MODEL = "ferry-tiny-tools"


# --- end to end: a worker with --tool-call-parser hermes -------------------------------


@pytest.fixture(scope="module")
def tools_model(stack: Stack, logs: Path, tool_dir: Path) -> Iterator[str]:
    proc = stack.add_worker(
        "worker-tools",
        TOOLS_MODEL,
        "vllm",
        logs,
        model=str(tool_dir),
        FERRY_TOOL_CALL_PARSER="hermes",
    )
    yield TOOLS_MODEL
    proc.stop()
    stack.procs.remove(proc)


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)


def _forced(tool_dir: Path, **extra: Any) -> dict[str, Any]:
    """A request whose reply is the tool-call token (and only it)."""
    return {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        "max_tokens": 1,
        "temperature": 0,
        "logit_bias": {str(tool_token_id(tool_dir)): 100},
        **extra,
    }


def test_a_forced_tool_call_is_answered_as_tool_calls(
    stack: Stack, tools_model: str, tool_dir: Path
) -> None:
    body = _forced(tool_dir)
    out = sdk(stack).chat.completions.create(model=tools_model, **body)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking. "
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # The job's result has them too.
    with stack.client() as client:
        job = client.get(f"/v1/jobs/{out.id}").json()
    assert job["result"]["finish_reason"] == "tool_calls"
    assert job["result"]["text"] == "Checking. "
    assert job["result"]["tool_calls"] == [call.model_dump()]


def test_a_forced_tool_call_streamed(stack: Stack, tools_model: str, tool_dir: Path) -> None:
    stream = sdk(stack).chat.completions.create(model=tools_model, stream=True, **_forced(tool_dir))
    deltas, reasons = [], []
    for piece in stream:
        for c in piece.choices:
            deltas.append(c.delta)
            reasons.append(c.finish_reason)
    content = "".join(d.content or "" for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert content == "Checking. "  # the tool-call text itself never streams as content
    [call] = calls
    assert call.index == 0 and call.id and call.function is not None
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments or "") == {"city": "Paris", "unit": "celsius"}
    assert reasons[-1] == "tool_calls"


def test_tool_choice_none_leaves_the_reply_unparsed(
    stack: Stack, tools_model: str, tool_dir: Path
) -> None:
    """`none`: no parsing, so no special tokens kept either (as in vLLM): the forced token,
    a special one, leaves no text, and nothing is called."""
    out = sdk(stack).chat.completions.create(
        model=tools_model, **_forced(tool_dir, tool_choice="none")
    )
    assert out.choices[0].message.content == ""
    assert not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 1


def _prompt_tokens(stack: Stack, body: dict[str, Any]) -> int:
    with stack.client() as client:
        r = client.post("/v1/chat/completions", json={"max_tokens": 1, **body})
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens"])


def test_tools_and_tool_turns_reach_the_prompt(stack: Stack, tools_model: str) -> None:
    """The template renders the tools, the assistant's call and the tool's answer: each
    adds to the prompt."""
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    bare = _prompt_tokens(stack, {"model": tools_model, "messages": ask})
    with_tools = _prompt_tokens(
        stack, {"model": tools_model, "messages": ask, "tools": [WEATHER_TOOL]}
    )
    assert with_tools > bare + 20
    turns = [{**m, "content": m["content"] or None} for m in HISTORY]
    history = _prompt_tokens(
        stack, {"model": tools_model, "messages": turns, "tools": [WEATHER_TOOL]}
    )
    no_call = [turns[0], {"role": "assistant", "content": ""}, turns[2]]
    assert history > _prompt_tokens(
        stack, {"model": tools_model, "messages": no_call, "tools": [WEATHER_TOOL]}
    )


def test_tools_need_a_tool_call_parser(stack: Stack) -> None:
    with stack.client() as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": TINY,
                "messages": [{"role": "user", "content": "Hi"}],
                "tools": [WEATHER_TOOL],
            },
        )
    error = assert_error(r, 400, "unsupported_parameter")
    assert error["param"] == "tools" and "--tool-call-parser" in error["message"]


CLOCK_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "strict": True,
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}},
            "required": ["zone"],
        },
    },
}


def _clock(choice: Any, **extra: Any) -> dict[str, Any]:
    """A forced choice of a tool whose only argument is an enum: held to hermes' call
    format and the tool's strict schema, even a random model's reply is one whole call
    (the grammar allows it some whitespace, which the random model spends tokens on)."""
    return {
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": [WEATHER_TOOL, CLOCK_TOOL],
        "tool_choice": choice,
        "parallel_tool_calls": False,
        "max_tokens": 400,
        "temperature": 0,
        **extra,
    }


@pytest.mark.parametrize(
    ("choice", "finish"),
    [
        ("required", "tool_calls"),
        ({"type": "function", "function": {"name": "get_time"}}, "stop"),
    ],
)
def test_a_forced_tool_choice_answers_a_call(
    stack: Stack, tools_model: str, choice: Any, finish: str
) -> None:
    """`required` and a named function are forced as vLLM forces them (structured
    outputs); finish_reason as vLLM's: `tool_calls` for `required`, `stop` for a named one."""
    out = sdk(stack).chat.completions.create(model=tools_model, **_clock(choice))
    result = out.choices[0]
    assert result.finish_reason == finish, result.message
    [call] = result.message.tool_calls or []
    if isinstance(choice, dict):
        assert call.function.name == "get_time"
    else:
        assert call.function.name in ("get_time", "get_weather")
    if call.function.name == "get_time":
        assert json.loads(call.function.arguments)["zone"] in ("utc", "local")


def test_a_forced_tool_choice_streamed(stack: Stack, tools_model: str) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    stream = sdk(stack).chat.completions.create(model=tools_model, stream=True, **_clock(named))
    calls = [tc for piece in stream for c in piece.choices for tc in c.delta.tool_calls or []]
    [call] = calls
    assert call.function is not None and call.function.name == "get_time"
    assert json.loads(call.function.arguments or "")["zone"] in ("utc", "local")


@pytest.mark.parametrize(
    ("choice", "extra", "words"),
    [
        ({"type": "function", "function": {"name": "no_such_tool"}}, {}, "no_such_tool"),
        ({"type": "function"}, {}, "must be"),
        ("sometimes", {}, "sometimes"),
        ("required", {"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_a_bad_tool_choice_is_400_naming_it(
    stack: Stack, tools_model: str, choice: Any, extra: dict[str, Any], words: str
) -> None:
    with stack.client() as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": tools_model,
                "messages": [{"role": "user", "content": "Hi"}],
                "tools": [WEATHER_TOOL],
                "tool_choice": choice,
                **extra,
            },
        )
    error = assert_error(r, 400, "invalid_value")
    assert error["param"] == "tool_choice" and words in error["message"]


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([{"type": "function"}], "tools.0.function"),
        ([{"type": "function", "function": {"name": "has space"}}], "tools.0.function.name"),
        ([{"type": "code_interpreter"}], "tools.0.type"),
    ],
)
def test_malformed_tools_are_400_naming_the_field(
    stack: Stack, tools_model: str, tools: Any, param: str
) -> None:
    with stack.client() as client:
        r = client.post(
            "/v1/chat/completions",
            json={
                "model": tools_model,
                "messages": [{"role": "user", "content": "Hi"}],
                "tools": tools,
            },
        )
    assert assert_error(r, 400)["param"] == param


def test_a_batch_line_with_tools_answers_tool_calls(
    stack: Stack, tools_model: str, tool_dir: Path
) -> None:
    """Batch lines (bulk lane, not streamed) are parsed the same way; the output line's
    body is the chat completion the route would give."""
    client = sdk(stack)
    line = {
        "custom_id": "t1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": tools_model, **_forced(tool_dir)},
    }
    data = (json.dumps(line) + "\n").encode()
    file_id = client.files.create(file=("in.jsonl", data, "application/jsonl"), purpose="batch").id
    batch = client.batches.create(
        input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed" and batch.output_file_id, batch
    [out] = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    choice = out["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking. "
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"


def test_tools_on_the_transformers_engine(stack: Stack, logs: Path, tool_dir: Path) -> None:
    """The transformers engine renders tools and parses with vLLM's parser over its own
    (Hugging Face) tokenizer."""
    name = f"{TOOLS_MODEL}-hf"
    proc = stack.add_worker(
        "worker-tools-hf",
        name,
        "transformers",
        logs,
        model=str(tool_dir),
        FERRY_TOOL_CALL_PARSER="hermes",
    )
    try:
        out = httpx.post(
            f"{stack.url}/v1/chat/completions",
            timeout=120,
            headers={"Authorization": f"Bearer {KEY_A}"},
            json={"model": name, **_forced(tool_dir)},
        ).json()
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", out
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        # A forced choice needs structured outputs, which this engine has not.
        refused = httpx.post(
            f"{stack.url}/v1/chat/completions",
            timeout=30,
            headers={"Authorization": f"Bearer {KEY_A}"},
            json={"model": name, **_clock("required")},
        )
        error = assert_error(refused, 400, "unsupported_parameter")
        assert error["param"] == "tool_choice" and "transformers" in error["message"]
    finally:
        proc.stop()
        stack.procs.remove(proc)
