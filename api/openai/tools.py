"""Function tools in a chat request, as stored with its job (see worker/tool_calls.py).

In `Job.request` (storage.stored_request.StoredRequest) a request with `tools` carries
`tools` (OpenAI function tools, as sent), `tool_choice` (`auto`, `none`, `required` or a
named function) and, when false, `parallel_tool_calls`. Its messages keep an assistant
turn's `tool_calls` and a tool answer's `tool_call_id` in OpenAI's shape: the worker hands
them to the chat template (arguments decoded, as vLLM does).
"""

from __future__ import annotations

from typing import Any

from api.openai.schemas import AssistantMessage, ChatCompletionRequest, ToolCall
from storage.content import split_reasoning
from storage.stored_request import StoredRequest


def tool_fields(body: ChatCompletionRequest) -> dict[str, Any]:
    """The request's tool fields as stored (checked already: api.openai.request_fields)."""
    if not body.tools:
        return {}
    fields: dict[str, Any] = {
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools],
        "tool_choice": body.tool_choice or "auto",
    }
    if body.parallel_tool_calls is False:
        fields["parallel_tool_calls"] = False
    return fields


def with_tool_turns(
    body: ChatCompletionRequest, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The stored messages (one per request message, in order) with their tool calls and
    tool-call ids put back."""
    out = []
    for message, stored in zip(body.messages, messages, strict=True):
        if message.tool_calls:
            stored = {**stored, "tool_calls": [c.model_dump() for c in message.tool_calls]}
        if message.tool_call_id is not None:
            stored = {**stored, "tool_call_id": message.tool_call_id}
        out.append(stored)
    return out


def reply_message(row: Any) -> AssistantMessage:
    """A finished chat job's reply (a `Job`, or a row with its result columns) as OpenAI's
    assistant message: reasoning split off as the request asked, and the tools it calls
    (the content is then what the tool-call parser left of it, as vLLM answers)."""
    reasoning, content = None, row.result_text or ""
    mode = StoredRequest.reasoning_of(row.request or {})
    if mode is not None:
        reasoning, content = split_reasoning(content, mode)
    if row.tool_calls is None:
        return AssistantMessage(content=content, reasoning_content=reasoning)
    return AssistantMessage(
        content=row.result_content,
        reasoning_content=reasoning,
        tool_calls=[ToolCall.model_validate(call) for call in row.tool_calls],
    )
