"""Tool calls in a finished reply, found by vLLM's own parsers (`--tool-call-parser`).

The worker does what vLLM's chat server does with a request that has tools, through the
same public object: the parser `ParserManager.get_parser(tool_parser_name=NAME)` composes
for that tool parser. Before generation its `adjust_request` says how the reply must be
generated: a forced `tool_choice` (`required`, or a named function), and for parsers with
a strict format also `auto` where the tools ask for it, become a structured-output
constraint (a JSON schema, or an xgrammar structural tag in the parser's own call
format); some parsers need special tokens kept. When the job ends, its `parse` reads the
whole reply, as vLLM does for a non-streamed answer. The calls (OpenAI's shape) and the
content left are stored with the result (Job.tool_calls, Job.result_content) and sent
with the job's `done` event.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, cast

from storage.content import ReasoningMode, split_reasoning
from storage.stored_request import StoredRequest
from worker.errors import StartupError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """The tools a reply calls, and its content once the tool-call text is taken out
    (None when nothing else was said)."""

    calls: list[dict[str, Any]]
    content: str | None


@dataclass(frozen=True, slots=True)
class ToolGeneration:
    """How a reply to a request with tools is generated, as vLLM's parser adjusts it."""

    # For the engine's structured outputs: {"json": schema} or {"structural_tag": json}.
    constraint: dict[str, Any] | None
    skip_special_tokens: bool


class ToolCallParser:
    """vLLM's parser for one of its tool-call parsers, by name, over the engine's
    tokenizer. Parser instances keep state, so each reply gets a fresh one (as each vLLM
    request does)."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.parser.parser_manager import ParserManager

        self.name = name
        parser_class = ParserManager.get_parser(
            tool_parser_name=name, enable_auto_tools=True, tokenizer=tokenizer
        )
        if parser_class is None:
            raise ValueError(f"vLLM has no parser for tool-call parser {name!r}")
        self._parser_class = parser_class
        self._tokenizer = tokenizer
        self._request_class = ChatCompletionRequest

    def _for(self, request: StoredRequest) -> tuple[Any, Any]:
        """vLLM's request for the stored one (what its parsers read: the tools,
        tool_choice and parallel_tool_calls), and a fresh parser for it."""
        vllm_request = self._request_class.model_validate(
            {
                "model": "ferry",
                "messages": [],
                "tools": request.tools,
                "tool_choice": request.tool_choice or "auto",
                "parallel_tool_calls": request.parallel_tool_calls,
            }
        )
        # (list is invariant: vLLM types the argument with every tool kind it knows)
        return vllm_request, self._parser_class(self._tokenizer, cast(Any, vllm_request.tools))

    def generation(self, request: StoredRequest) -> ToolGeneration:
        """How the reply to the stored `request` is generated (`adjust_request`)."""
        vllm_request, parser = self._for(request)
        adjusted = parser.adjust_request(vllm_request)
        outputs, constraint = adjusted.structured_outputs, None
        if outputs is not None and outputs.structural_tag is not None:
            constraint = {"structural_tag": outputs.structural_tag}
        elif outputs is not None and outputs.json is not None:
            schema = outputs.json
            constraint = {"json": json.loads(schema) if isinstance(schema, str) else schema}
        return ToolGeneration(constraint, bool(adjusted.skip_special_tokens))

    def parse(self, text: str, request: StoredRequest) -> ToolCalls | None:
        """The tool calls in `text`, the reply to the stored `request`; None when it calls
        none. With a reasoning mode, only the content after the reasoning is parsed (as
        vLLM does); the reasoning is not part of `ToolCalls.content`."""
        mode: ReasoningMode | None = request.reasoning
        content = split_reasoning(text, mode)[1] if mode else text
        vllm_request, parser = self._for(request)
        _, left, found = parser.parse(content, vllm_request, enable_auto_tools=True)
        if not found:
            return None
        calls = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in found
        ]
        if vllm_request.parallel_tool_calls is False:
            calls = calls[:1]  # as vLLM's maybe_filter_parallel_tool_calls
        return ToolCalls(calls, left if left and left.strip() else None)

    def parse_quietly(self, text: str, request: StoredRequest) -> ToolCalls | None:
        """`parse`, where a parser that fails leaves the reply as plain content (logged):
        the answer is still the model's."""
        try:
            return self.parse(text, request)
        except Exception:
            log.exception(
                "tool-call parser %s failed on a reply; answering it as content", self.name
            )
            return None


def load_parser(name: str | None, tokenizer: Any) -> ToolCallParser | None:
    """The worker's parser (`--tool-call-parser`), or None without one. It is tried on
    the model's tokenizer once now: a parser that cannot work with this model (its tags
    are not in the vocabulary, say) stops the worker at start, not a user's request."""
    if name is None:
        return None
    try:
        parser = ToolCallParser(name, tokenizer)
        parser.parse("", StoredRequest(tools=[{"type": "function", "function": {"name": "probe"}}]))
    except Exception as exc:
        raise StartupError(
            f"--tool-call-parser {name}: cannot parse this model's output: {exc}"
        ) from exc
    return parser
