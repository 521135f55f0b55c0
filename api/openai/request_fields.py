"""Fields a chat or completions request may carry beyond those Ferry declares: none is
silently ignored.

OpenAI's and vLLM's fields that Ferry does not honour are refused by name (400,
`unsupported_parameter`) unless they carry their neutral value (what sending nothing
means: clients that send every default still work). Any other field is refused as
unrecognized, as OpenAI does (vLLM would ignore it with a warning).
"""

from __future__ import annotations

from typing import Any

from api.core.errors import InvalidRequest
from api.openai.schemas import ChatCompletionRequest, SamplingFields
from storage.registry import ServedModel

# Field -> the values that mean "not used" (accepted, changing nothing).
_NOT_HONOURED: dict[str, tuple[Any, ...]] = {
    # vLLM's sampling and output extensions
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "stop_token_ids": ([],),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "truncation_side": (),
    "prompt_logprobs": (),
    "logprob_token_ids": (),
    "allowed_token_ids": (),
    "bad_words": ([],),
    "structured_outputs": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "thinking_token_budget": (),
    "repetition_detection": (),
    "watermarking": (False,),
    "prompt_embeds": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "return_token_offsets": (False,),
    "return_prompt_text": (False,),
    "return_mm_kwargs": (False,),
    "stream_interval": (1,),
    "request_id": (),
    "session_id": (),
    "cache_salt": (),
    "kv_transfer_params": (),
    "ec_transfer_params": (),
    "vllm_xargs": (),
    "mm_payload": (),
    "routed_experts_prompt_start": (0,),
    # OpenAI's
    "store": (False,),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "verbosity": (),
    "reasoning_effort": (),
    "functions": (),
    "function_call": (),
}
_CHAT_NOT_HONOURED: dict[str, tuple[Any, ...]] = {
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "add_special_tokens": (False,),
    "documents": (),
    "chat_template": (),
    "media_io_kwargs": (),
    "mm_processor_kwargs": (),
    "include_reasoning": (True,),
}
_COMPLETION_NOT_HONOURED: dict[str, tuple[Any, ...]] = {
    "add_special_tokens": (True,),
}
# Identifiers for the caller's own bookkeeping (like `user`): accepted, no effect on output.
_IDENTIFIERS = frozenset({"safety_identifier", "prompt_cache_key"})


def check_fields(body: SamplingFields, model: ServedModel) -> None:
    """Refuse what the request asks for that Ferry would not do (see the module doc)."""
    chat = isinstance(body, ChatCompletionRequest)
    specific = _CHAT_NOT_HONOURED if chat else _COMPLETION_NOT_HONOURED
    for name, value in (body.model_extra or {}).items():
        if name in _IDENTIFIERS:
            continue
        neutral = specific.get(name, _NOT_HONOURED.get(name))
        if neutral is None:
            raise InvalidRequest(
                f"Unrecognized request argument supplied: {name}",
                param=name,
                code="unknown_parameter",
            )
        if value is not None and value not in neutral:
            raise InvalidRequest(
                f"`{name}` is not supported by this server.",
                param=name,
                code="unsupported_parameter",
            )
    if isinstance(body, ChatCompletionRequest):
        _check_tools(body, model)


def _check_tools(body: ChatCompletionRequest, model: ServedModel) -> None:
    """`tools` need a tool-call parser on the model's workers (vLLM's, by name).
    `tool_choice` `required` or naming a function is forced as vLLM forces it, through
    structured outputs (worker/tool_calls.py): only on an engine that has them, and not
    together with `response_format`, which the forced schema would replace."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise InvalidRequest(
                "`tool_choice` needs `tools`.", param="tool_choice", code="unsupported_parameter"
            )
        return
    if model.tool_call_parser is None:
        raise InvalidRequest(
            f"`tools` is not supported for model `{model.name}`: it has no tool-call "
            "parser; start its worker with --tool-call-parser NAME (one of vLLM's "
            "parsers, e.g. hermes) to use tools.",
            param="tools",
            code="unsupported_parameter",
        )
    if choice in (None, "none", "auto"):
        return
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidRequest(
                "`tool_choice` must be `none`, `auto`, `required` or "
                '{"type": "function", "function": {"name": NAME}}.',
                param="tool_choice",
                code="invalid_value",
            )
        if name not in {tool.function.name for tool in body.tools}:
            raise InvalidRequest(
                f"`tool_choice` names function `{name}`, which is not in `tools`.",
                param="tool_choice",
                code="invalid_value",
            )
    elif choice != "required":
        raise InvalidRequest(
            f"`tool_choice` `{choice}` is not one of `none`, `auto`, `required` or a "
            "named function.",
            param="tool_choice",
            code="invalid_value",
        )
    if not model.supports_structured_output:
        raise InvalidRequest(
            f"`tool_choice` other than `auto` or `none` is not supported for model "
            f"`{model.name}`: it runs on the `{model.engine}` engine, which cannot constrain "
            "output; a forced tool choice needs a vLLM worker.",
            param="tool_choice",
            code="unsupported_parameter",
        )
    if body.response_format is not None and body.response_format.type != "text":
        raise InvalidRequest(
            "`tool_choice` `required` or a named function cannot be combined with "
            "`response_format`: the reply is held to the tools' schema.",
            param="tool_choice",
            code="invalid_value",
        )
