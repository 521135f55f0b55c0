"""`tools` / `tool_choice`: function tools reach the chat template, and a model's reply is
parsed with vLLM's own tool-call parser (`--tool-call-parser`) into OpenAI `tool_calls`.

The parse step runs vLLM's real `hermes` parser over a real tokenizer. End to end, a
worker with `--tool-call-parser hermes` serves the tiny model built for tool calls
(tests/tool_model.py): its template renders tools, and one token of its vocabulary is a
whole Hermes tool call, which `logit_bias` forces the model to emit."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.openai.chat import _Choice, _chunks_for
from storage.events import EventType, JobEvent, done_data
from storage.stored_request import StoredRequest
from tests.conftest import KEY_A, TINY, Stack
from tests.helpers import assert_error
from tests.tool_model import (
    TOOL_CALL_TEXT,
    WEATHER_TOOL,
    build_tool_model,
    tool_token_id,
)
from worker.engines.base import GenerationRequest
from worker.engines.common import prompt_text
from worker.errors import StartupError
from worker.models.tiny import ensure_tiny_model
from worker.tool_calls import ToolCallParser, load_parser

TOOLS_MODEL = "ferry-tiny-tools"


@pytest.fixture(scope="module")
def tool_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tool_model(ensure_tiny_model(TINY, model_cache),
                            tmp_path_factory.mktemp("tools") / "tiny-tools")


@pytest.fixture(scope="module")
def tokenizer(tool_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tool_dir)


@pytest.fixture(scope="module")
def hermes(tokenizer: Any) -> ToolCallParser:
    return ToolCallParser("hermes", tokenizer)


STORED = StoredRequest(tools=[WEATHER_TOOL], tool_choice="auto")


def stored(**update: Any) -> StoredRequest:
    return STORED.model_copy(update=update)


# --- the worker's parse step: vLLM's hermes parser, a real tokenizer -------------------

def test_a_reply_that_calls_a_tool_is_parsed_into_tool_calls(hermes: ToolCallParser) -> None:
    found = hermes.parse(TOOL_CALL_TEXT, STORED)
    assert found is not None
    [call] = found.calls
    assert call["type"] == "function" and call["id"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    # The content is what precedes the tool-call text, as vLLM answers it.
    assert found.content == "Checking. "


def test_a_reply_without_a_call_is_left_as_content(hermes: ToolCallParser) -> None:
    assert hermes.parse("It is sunny in Paris.", STORED) is None


def test_a_parser_that_does_not_fit_the_model_stops_the_worker(tokenizer: Any) -> None:
    """Tried on the tokenizer at start: jamba's parser needs its `<tool_calls>` tokens in
    the vocabulary, which this model lacks."""
    assert load_parser(None, tokenizer) is None
    assert load_parser("hermes", tokenizer) is not None
    with pytest.raises(StartupError, match=r"--tool-call-parser jamba: .*tokens"):
        load_parser("jamba", tokenizer)


def test_hermes_asks_to_keep_special_tokens(hermes: ToolCallParser) -> None:
    """vLLM's hermes parser keeps special tokens in the text of a reply to a request with
    tools (its tags are special tokens in some models); the worker asks the parser."""
    assert hermes.generation(STORED).skip_special_tokens is False
    assert hermes.generation(stored(tool_choice="none")).skip_special_tokens is True


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("choice", ["required", NAMED])
def test_a_forced_tool_choice_is_a_constraint_in_the_parsers_format(
    hermes: ToolCallParser, choice: Any
) -> None:
    """As vLLM forces it: hermes has a strict call format, so the reply is held to an
    xgrammar structural tag that opens with its `<tool_call>` for that function."""
    how = hermes.generation(stored(tool_choice=choice))
    assert how.constraint is not None
    tag = json.loads(how.constraint["structural_tag"])
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in json.dumps(tag["format"]) \
        .encode().decode("unicode_escape")
    assert hermes.generation(STORED).constraint is None  # `auto`, tools not strict


def test_a_forced_reply_is_read_in_the_parsers_format(hermes: ToolCallParser) -> None:
    for choice in ("required", NAMED):
        found = hermes.parse(TOOL_CALL_TEXT, stored(tool_choice=choice))
        assert found is not None and found.calls[0]["function"]["name"] == "get_weather"


def test_a_json_format_parser_reads_the_forced_json(tokenizer: Any) -> None:
    """A parser without a structural format of its own (vLLM's `pythonic`) is forced with
    a JSON schema, as vLLM does: `required` holds the reply to a list of
    `{name, parameters}`, read back as calls; a named function to its arguments."""
    parser = ToolCallParser("pythonic", tokenizer)
    how = parser.generation(stored(tool_choice="required", parallel_tool_calls=False))
    assert how.constraint is not None
    schema = how.constraint["json"]
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    assert schema["items"]["anyOf"][0]["properties"]["name"] == {
        "type": "string", "enum": ["get_weather"]}
    named_how = parser.generation(stored(tool_choice=NAMED))
    assert named_how.constraint == {"json": WEATHER_TOOL["function"]["parameters"]}
    required = parser.parse('[{"name": "get_weather", "parameters": {"city": "Oslo"}}]',
                            stored(tool_choice="required"))
    assert required is not None and required.content is None
    [call] = required.calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    named = parser.parse('{"city": "Oslo"}', stored(tool_choice=NAMED))
    assert named is not None
    assert named.calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_parallel_calls_and_parallel_tool_calls_false(hermes: ToolCallParser) -> None:
    two = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
           '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>')
    found = hermes.parse(two, STORED)
    assert found is not None and found.content is None
    assert [json.loads(c["function"]["arguments"])["city"] for c in found.calls] == [
        "Paris", "Rome"]
    first = hermes.parse(two, stored(parallel_tool_calls=False))
    assert first is not None and len(first.calls) == 1


def test_reasoning_is_not_parsed_for_calls(hermes: ToolCallParser) -> None:
    """With a reasoning split, only the content after `</think>` is the parser's input (a
    tool call the model merely considers while thinking is not a call)."""
    thought = ('<think>Maybe <tool_call>{"name": "get_weather", "arguments": {"city": '
               '"Oslo"}}</tool_call>?</think>' + TOOL_CALL_TEXT)
    found = hermes.parse(thought, stored(reasoning="tagged"))
    assert found is not None and len(found.calls) == 1
    assert json.loads(found.calls[0]["function"]["arguments"])["city"] == "Paris"
    assert found.content == "Checking. "


# --- the chat template gets tools and tool turns in OpenAI's shape ---------------------

HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "content": "18 degrees, sunny", "tool_call_id": "call_1"},
]


def test_tools_and_tool_turns_reach_the_template(tokenizer: Any) -> None:
    text = prompt_text(tokenizer, GenerationRequest("r", messages=HISTORY,
                                                    tools=[WEATHER_TOOL]))
    assert '"name": "get_weather"' in text and "The current weather in a city" in text
    # Arguments arrive decoded (an object), as vLLM hands them to templates.
    assert '"arguments": {"city": "Paris"}' in text
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in text
    without = prompt_text(tokenizer, GenerationRequest("r", messages=HISTORY))
    assert "<tools>" not in without and "<tools>" in text


def test_smollm2s_template_does_not_render_tools(model_cache: Path) -> None:
    """SmolLM2-135M-Instruct's ChatML template never reads `tools`: served with a parser,
    tools would not reach its prompt (which is why the suite uses its own template)."""
    smol = model_cache / "SmolLM2-135M-Instruct-v1"
    if not (smol / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 not built in this model cache yet (its worker builds it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    messages = [{"role": "user", "content": "Hi"}]
    assert prompt_text(tok, GenerationRequest("r", messages=messages, tools=[WEATHER_TOOL])) \
        == prompt_text(tok, GenerationRequest("r", messages=messages))


# --- the stream: content held back, calls in one chunk before the finish ---------------

def test_streamed_reply_holds_content_and_sends_calls_in_one_chunk() -> None:
    choice = _Choice("job", 0, TINY, 0, None, [])
    chunks = _chunks_for(choice, JobEvent("1-1", EventType.DELTA, {"text": "Checking. <tool"}))
    chunks += _chunks_for(choice, JobEvent("1-2", EventType.DELTA, {"text": "_call>{...}"}))
    assert chunks == []  # nothing of the raw text goes out
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{}"}}
    end = _chunks_for(choice, JobEvent("1-3", EventType.DONE,
                                       done_data("tool_calls", [call], "Checking. ")))
    assert [c["choices"][0]["delta"] for c in end] == [
        {"content": "Checking. ", "tool_calls": [{"index": 0, **call}]}, {}]
    assert end[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_reply_without_calls_sends_the_held_content() -> None:
    choice = _Choice("job", 0, TINY, 0, None, [])
    assert _chunks_for(choice, JobEvent("1-1", EventType.DELTA, {"text": "Sunny"})) == []
    end = _chunks_for(choice, JobEvent("1-2", EventType.DONE, done_data("stop", None, None)))
    assert [c["choices"][0]["delta"] for c in end] == [{"content": "Sunny"}, {}]


# --- end to end: a worker with --tool-call-parser hermes -------------------------------

@pytest.fixture(scope="module")
def tools_model(stack: Stack, logs: Path, tool_dir: Path) -> Iterator[str]:
    proc = stack.add_worker("worker-tools", TOOLS_MODEL, "vllm", logs, model=str(tool_dir),
                            FERRY_TOOL_CALL_PARSER="hermes")
    yield TOOLS_MODEL
    proc.stop()
    stack.procs.remove(proc)


def sdk(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)


def _forced(tool_dir: Path, **extra: Any) -> dict[str, Any]:
    """A request whose reply is the tool-call token (and only it)."""
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL], "max_tokens": 1, "temperature": 0,
            "logit_bias": {str(tool_token_id(tool_dir)): 100}, **extra}


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
    stream = sdk(stack).chat.completions.create(model=tools_model, stream=True,
                                                **_forced(tool_dir))
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
    out = sdk(stack).chat.completions.create(model=tools_model,
                                             **_forced(tool_dir, tool_choice="none"))
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
    with_tools = _prompt_tokens(stack, {"model": tools_model, "messages": ask,
                                        "tools": [WEATHER_TOOL]})
    assert with_tools > bare + 20
    turns = [{**m, "content": m["content"] or None} for m in HISTORY]
    history = _prompt_tokens(stack, {"model": tools_model, "messages": turns,
                                     "tools": [WEATHER_TOOL]})
    no_call = [turns[0], {"role": "assistant", "content": ""}, turns[2]]
    assert history > _prompt_tokens(stack, {"model": tools_model, "messages": no_call,
                                            "tools": [WEATHER_TOOL]})


def test_tools_need_a_tool_call_parser(stack: Stack) -> None:
    with stack.client() as client:
        r = client.post("/v1/chat/completions", json={
            "model": TINY, "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL]})
    error = assert_error(r, 400, "unsupported_parameter")
    assert error["param"] == "tools" and "--tool-call-parser" in error["message"]


CLOCK_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time", "strict": True,
        "parameters": {"type": "object", "additionalProperties": False,
                       "properties": {"zone": {"type": "string", "enum": ["utc", "local"]}},
                       "required": ["zone"]},
    },
}


def _clock(choice: Any, **extra: Any) -> dict[str, Any]:
    """A forced choice of a tool whose only argument is an enum: held to hermes' call
    format and the tool's strict schema, even a random model's reply is one whole call
    (the grammar allows it some whitespace, which the random model spends tokens on)."""
    return {"messages": [{"role": "user", "content": "What time is it?"}],
            "tools": [WEATHER_TOOL, CLOCK_TOOL], "tool_choice": choice,
            "parallel_tool_calls": False, "max_tokens": 400, "temperature": 0, **extra}


@pytest.mark.parametrize(("choice", "finish"), [
    ("required", "tool_calls"),
    ({"type": "function", "function": {"name": "get_time"}}, "stop"),
])
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
    stream = sdk(stack).chat.completions.create(model=tools_model, stream=True,
                                                **_clock(named))
    calls = [tc for piece in stream for c in piece.choices for tc in c.delta.tool_calls or []]
    [call] = calls
    assert call.function is not None and call.function.name == "get_time"
    assert json.loads(call.function.arguments or "")["zone"] in ("utc", "local")


@pytest.mark.parametrize(("choice", "extra", "words"), [
    ({"type": "function", "function": {"name": "no_such_tool"}}, {}, "no_such_tool"),
    ({"type": "function"}, {}, "must be"),
    ("sometimes", {}, "sometimes"),
    ("required", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_a_bad_tool_choice_is_400_naming_it(
    stack: Stack, tools_model: str, choice: Any, extra: dict[str, Any], words: str
) -> None:
    with stack.client() as client:
        r = client.post("/v1/chat/completions", json={
            "model": tools_model, "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL], "tool_choice": choice, **extra})
    error = assert_error(r, 400, "invalid_value")
    assert error["param"] == "tool_choice" and words in error["message"]


@pytest.mark.parametrize(("tools", "param"), [
    ([{"type": "function"}], "tools.0.function"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools.0.function.name"),
    ([{"type": "code_interpreter"}], "tools.0.type"),
])
def test_malformed_tools_are_400_naming_the_field(
    stack: Stack, tools_model: str, tools: Any, param: str
) -> None:
    with stack.client() as client:
        r = client.post("/v1/chat/completions", json={
            "model": tools_model, "messages": [{"role": "user", "content": "Hi"}],
            "tools": tools})
    assert assert_error(r, 400)["param"] == param


def test_a_batch_line_with_tools_answers_tool_calls(
    stack: Stack, tools_model: str, tool_dir: Path
) -> None:
    """Batch lines (bulk lane, not streamed) are parsed the same way; the output line's
    body is the chat completion the route would give."""
    client = sdk(stack)
    line = {"custom_id": "t1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": tools_model, **_forced(tool_dir)}}
    data = (json.dumps(line) + "\n").encode()
    file_id = client.files.create(file=("in.jsonl", data, "application/jsonl"),
                                  purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
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


def test_tools_on_the_transformers_engine(
    stack: Stack, logs: Path, tool_dir: Path
) -> None:
    """The transformers engine renders tools and parses with vLLM's parser over its own
    (Hugging Face) tokenizer."""
    name = f"{TOOLS_MODEL}-hf"
    proc = stack.add_worker("worker-tools-hf", name, "transformers", logs,
                            model=str(tool_dir), FERRY_TOOL_CALL_PARSER="hermes")
    try:
        out = httpx.post(f"{stack.url}/v1/chat/completions", timeout=120,
                         headers={"Authorization": f"Bearer {KEY_A}"},
                         json={"model": name, **_forced(tool_dir)}).json()
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls", out
        assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
        # A forced choice needs structured outputs, which this engine has not.
        refused = httpx.post(f"{stack.url}/v1/chat/completions", timeout=30,
                             headers={"Authorization": f"Bearer {KEY_A}"},
                             json={"model": name, **_clock("required")})
        error = assert_error(refused, 400, "unsupported_parameter")
        assert error["param"] == "tool_choice" and "transformers" in error["message"]
    finally:
        proc.stop()
        stack.procs.remove(proc)
