"""Tool calls in a finished reply, found by vLLM's own tool-call parser (`--tool-call-parser`).

The worker parses a job's whole reply when it ends, as vLLM's server does for a
non-streamed answer: `ToolParserManager.get_tool_parser(name)(tokenizer, tools)` and its
`extract_tool_calls(text, request)`, the request being vLLM's `ChatCompletionRequest`
built from the job's stored tools. The calls (OpenAI's shape) and the content left
without the tool-call text are stored with the result (storage: Job.tool_calls,
Job.result_content) and sent with the job's `done` event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from storage.content import ReasoningMode, split_reasoning
from storage.stored_request import StoredRequest
from worker.engines.options import StartupError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """The tools a reply calls, and its content once the tool-call text is taken out
    (None when nothing else was said)."""

    calls: list[dict[str, Any]]
    content: str | None


class ToolCallParser:
    """One of vLLM's tool-call parsers, by name, over the engine's tokenizer. Parser
    instances keep state, so each reply gets a fresh one (as each vLLM request does)."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.tool_parsers import ToolParserManager

        self.name = name
        self._parser_class = ToolParserManager.get_tool_parser(name)
        self._tokenizer = tokenizer
        self._request_class = ChatCompletionRequest

    def _for(self, request: StoredRequest) -> tuple[Any, Any]:
        """vLLM's request for the stored one (what its parsers read: the tools and
        tool_choice), and a fresh parser for it."""
        vllm_request = self._request_class.model_validate({
            "model": "ferry", "messages": [], "tools": request.tools,
            "tool_choice": "auto",
            "parallel_tool_calls": request.parallel_tool_calls,
        })
        # (list is invariant: vLLM types the argument with every tool kind it knows)
        return vllm_request, self._parser_class(self._tokenizer, cast(Any, vllm_request.tools))

    def skips_special_tokens(self, request: StoredRequest) -> bool:
        """Whether the reply's text may leave special tokens out: vLLM's parser says so in
        `adjust_request` (hermes keeps them: its tags are special tokens in some models,
        and a tag dropped from the text would hide the call)."""
        vllm_request, parser = self._for(request)
        return bool(parser.adjust_request(vllm_request).skip_special_tokens)

    def parse(self, text: str, request: StoredRequest) -> ToolCalls | None:
        """The tool calls in `text`, the reply to the stored `request`; None when it calls
        none. With a reasoning mode, only the content after the reasoning is parsed (as
        vLLM does); the reasoning is not part of `ToolCalls.content`."""
        mode: ReasoningMode | None = request.reasoning
        content = split_reasoning(text, mode)[1] if mode else text
        vllm_request, parser = self._for(request)
        info = parser.extract_tool_calls(content, vllm_request)
        if not info.tools_called or not info.tool_calls:
            return None
        calls = [{"id": call.id, "type": "function",
                  "function": {"name": call.function.name,
                               "arguments": call.function.arguments}}
                 for call in info.tool_calls]
        if vllm_request.parallel_tool_calls is False:
            calls = calls[:1]  # as vLLM's maybe_filter_parallel_tool_calls
        left = info.content if info.content and info.content.strip() else None
        return ToolCalls(calls, left)

    def parse_quietly(self, text: str, request: StoredRequest) -> ToolCalls | None:
        """`parse`, where a parser that fails leaves the reply as plain content (logged):
        the answer is still the model's."""
        try:
            return self.parse(text, request)
        except Exception:
            log.exception("tool-call parser %s failed on a reply; answering it as content",
                          self.name)
            return None


def load_parser(name: str | None, tokenizer: Any) -> ToolCallParser | None:
    """The worker's parser (`--tool-call-parser`), or None without one. It is tried on
    the model's tokenizer once now: a parser that cannot work with this model (its tags
    are not in the vocabulary, say) stops the worker at start, not a user's request."""
    if name is None:
        return None
    try:
        parser = ToolCallParser(name, tokenizer)
        parser.parse("", StoredRequest(tools=[{"type": "function",
                                               "function": {"name": "probe"}}]))
    except Exception as exc:
        raise StartupError(f"--tool-call-parser {name}: cannot parse this model's output: "
                           f"{exc}") from exc
    return parser
