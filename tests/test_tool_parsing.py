"""`tools` / `tool_choice` in the worker and the API, no engine: a model's reply is parsed
with vLLM's own tool-call parser (`--tool-call-parser`) into OpenAI `tool_calls`, tools
reach the chat template, and the stream holds content back until the calls are known.

The parse step runs vLLM's real `hermes` parser over a real tokenizer of the tiny model
built for tool calls (tests/tool_model.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.openai.chat import _Choice, _chunks_for
from storage.events import EventType, JobEvent, done_data
from storage.stored_request import StoredRequest
from tests.conftest import TINY
from tests.tool_model import HISTORY, TOOL_CALL_TEXT, WEATHER_TOOL
from worker.engines.base import GenerationRequest
from worker.engines.common import prompt_text
from worker.errors import StartupError
from worker.tool_calls import ToolCallParser, load_parser


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
    assert '<tool_call>\n{"name": "get_weather", "arguments": ' in json.dumps(
        tag["format"]
    ).encode().decode("unicode_escape")
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
        "type": "string",
        "enum": ["get_weather"],
    }
    named_how = parser.generation(stored(tool_choice=NAMED))
    assert named_how.constraint == {"json": WEATHER_TOOL["function"]["parameters"]}
    required = parser.parse(
        '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]', stored(tool_choice="required")
    )
    assert required is not None and required.content is None
    [call] = required.calls
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    named = parser.parse('{"city": "Oslo"}', stored(tool_choice=NAMED))
    assert named is not None
    assert named.calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_parallel_calls_and_parallel_tool_calls_false(hermes: ToolCallParser) -> None:
    two = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    )
    found = hermes.parse(two, STORED)
    assert found is not None and found.content is None
    assert [json.loads(c["function"]["arguments"])["city"] for c in found.calls] == [
        "Paris",
        "Rome",
    ]
    first = hermes.parse(two, stored(parallel_tool_calls=False))
    assert first is not None and len(first.calls) == 1


def test_reasoning_is_not_parsed_for_calls(hermes: ToolCallParser) -> None:
    """With a reasoning split, only the content after `</think>` is the parser's input (a
    tool call the model merely considers while thinking is not a call)."""
    thought = (
        '<think>Maybe <tool_call>{"name": "get_weather", "arguments": {"city": '
        '"Oslo"}}</tool_call>?</think>' + TOOL_CALL_TEXT
    )
    found = hermes.parse(thought, stored(reasoning="tagged"))
    assert found is not None and len(found.calls) == 1
    assert json.loads(found.calls[0]["function"]["arguments"])["city"] == "Paris"
    assert found.content == "Checking. "


# --- the chat template gets tools and tool turns in OpenAI's shape ---------------------


def test_tools_and_tool_turns_reach_the_template(tokenizer: Any) -> None:
    text = prompt_text(tokenizer, GenerationRequest("r", messages=HISTORY, tools=[WEATHER_TOOL]))
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
    assert prompt_text(
        tok, GenerationRequest("r", messages=messages, tools=[WEATHER_TOOL])
    ) == prompt_text(tok, GenerationRequest("r", messages=messages))


# --- the stream: content held back, calls in one chunk before the finish ---------------


def test_streamed_reply_holds_content_and_sends_calls_in_one_chunk() -> None:
    choice = _Choice("job", 0, TINY, 0, None, [])
    chunks = _chunks_for(choice, JobEvent("1-1", EventType.DELTA, {"text": "Checking. <tool"}))
    chunks += _chunks_for(choice, JobEvent("1-2", EventType.DELTA, {"text": "_call>{...}"}))
    assert chunks == []  # nothing of the raw text goes out
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    end = _chunks_for(
        choice, JobEvent("1-3", EventType.DONE, done_data("tool_calls", [call], "Checking. "))
    )
    assert [c["choices"][0]["delta"] for c in end] == [
        {"content": "Checking. ", "tool_calls": [{"index": 0, **call}]},
        {},
    ]
    assert end[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_reply_without_calls_sends_the_held_content() -> None:
    choice = _Choice("job", 0, TINY, 0, None, [])
    assert _chunks_for(choice, JobEvent("1-1", EventType.DELTA, {"text": "Sunny"})) == []
    end = _chunks_for(choice, JobEvent("1-2", EventType.DONE, done_data("stop", None, None)))
    assert [c["choices"][0]["delta"] for c in end] == [{"content": "Sunny"}, {}]
