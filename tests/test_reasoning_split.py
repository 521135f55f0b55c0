"""Reasoning split from content, tagged (`<think>`) and for models with a reasoning
parser: whole, streamed in any cuts, and an unopened reply left alone."""

from __future__ import annotations

import random
from typing import Any

import pytest

from api.openai.chat import _Choice, _chunks_for
from storage.content import ReasoningMode, ReasoningSplitter, split_reasoning
from storage.events import EventType, JobEvent

THINK = "think-tiny"  # a model name, as in tests/test_model_routing.py


# --- the split itself, for models with a reasoning parser -----------------------------


def _streamed(text: str, mode: ReasoningMode, cuts: list[int]) -> tuple[str | None, str]:
    splitter = ReasoningSplitter(mode)
    reasoning = content = ""
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        r, c = splitter.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = splitter.finish()
    return (reasoning + r) or None, content + c


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The template opened `<think>`: the reply has only the closing tag.
        ("weigh it\n</think>\n\nThe answer.", ("weigh it", "The answer.")),
        ("<think>\nweigh it\n</think>\n\nThe answer.", ("weigh it", "The answer.")),
        ("</think>only content", (None, "only content")),
        ("still thinking when cut off\n", ("still thinking when cut off", "")),
        ("<thi", ("<thi", "")),
        ("\n\n", (None, "")),
        ("a </think> b </think> c", ("a ", " b </think> c")),
    ],
)
def test_parser_mode_split_whole_and_streamed(text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text, "parser") == expected
    for size in range(1, len(text) + 1):  # every chunk size gives the same split
        assert _streamed(text, "parser", list(range(size, len(text), size))) == expected


def test_tagged_mode_still_leaves_an_unopened_reply_alone() -> None:
    assert split_reasoning("weigh it</think>answer") == (None, "weigh it</think>answer")


def _chat_chunks(choice: _Choice, deltas: list[str]) -> tuple[list[dict[str, Any]], str, str]:
    """The chat chunks of `deltas` then a stop, and the reasoning and content they carry."""
    chunks: list[dict[str, Any]] = []
    for i, text in enumerate(deltas):
        chunks += _chunks_for(choice, JobEvent(f"1-{i}", EventType.DELTA, {"text": text}))
    chunks += _chunks_for(choice, JobEvent("1-9", EventType.DONE, {"finish_reason": "stop"}))
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    return chunks, reasoning, content


def test_streamed_chunks_split_at_a_closing_tag_only() -> None:
    choice = _Choice("job-1", 0, THINK, 0, ReasoningSplitter("parser"))
    deltas = ["step", " one\n</th", "ink>\n\nFinal", " answer."]
    _, reasoning, content = _chat_chunks(choice, deltas)
    assert (reasoning, content) == ("step one", "Final answer.")


def _whole(text: str) -> tuple[str | None, str]:
    """The default (tagged) split of `text` streamed in up to five random pieces."""
    cuts = sorted(random.sample(range(len(text) + 1), min(len(text) + 1, 4)))
    return _streamed(text, "tagged", cuts)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nweigh it\n</think>\n\nThe answer.", ("weigh it", "The answer.")),
        ("  <think>a</think>b", ("a", "b")),
        ("no thinking here", (None, "no thinking here")),
        ("<think>cut off while thinking\n", ("cut off while thinking", "")),
        (
            "answer <think>not at the start</think>",
            (None, "answer <think>not at the start</think>"),
        ),
        ("<think></think>only content", (None, "only content")),
        ("<thi", (None, "<thi")),
    ],
)
def test_reasoning_split_whole_and_streamed(text: str, expected: tuple[str | None, str]) -> None:
    assert split_reasoning(text) == expected
    random.seed(text)
    for _ in range(50):  # any cut of the stream gives the same split
        assert _whole(text) == expected


def test_streamed_chunks_split_reasoning_from_content() -> None:
    choice = _Choice("job-1", 0, THINK, 0, ReasoningSplitter())
    deltas = ["<thi", "nk>\nstep one", " and two\n</th", "ink>\n\nFinal", " answer."]
    chunks, reasoning, content = _chat_chunks(choice, deltas)
    assert (reasoning, content) == ("step one and two", "Final answer.")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
