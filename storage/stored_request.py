"""`Job.request`: the request as the API stores it and the worker runs it (the contract
between api/ and worker/), one typed model instead of a dict read key by key.

The column stays JSON. Writers build a `StoredRequest` (unknown fields and wrong types
raise) and store `dump()`; readers take `StoredRequest.load(job.request)` once per job.
`load` reads every shape written so far: rows from before `version` are version 1, keys
it does not know are ignored (a newer writer's additions never break an older reader),
and a row from before `reasoning` has its `thinking` flag read as `reasoning: tagged`.
A change of meaning (not an added optional field) bumps `CURRENT_VERSION`, and `load`
upgrades the older shape.

How images and parts sit in `messages` / `prompt`: storage/content.py; tools:
api/openai/tools.py; `turn_start` and history: api/conversations/history.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from storage.content import ReasoningMode

CURRENT_VERSION = 1


class StoredRequest(BaseModel):
    """One job's request. Chat jobs carry `messages`, completion jobs `prompt`."""

    # Assignments are checked too: the API builds a request in steps (api/conversations/history.py).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    version: int = CURRENT_VERSION
    # The served model's name (the job's `model` column is what routing reads).
    model: str | None = None

    # The prompt: chat messages (content a string or a list of parts), or a completion's
    # prompt (a string or a list of parts).
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[dict[str, Any]] | None = None
    # A completion that echoes its prompt before the answer.
    echo: bool = False
    # A conversation's job: where the new turn starts in `messages` (api/conversations/history.py).
    turn_start: int | None = None

    # Sampling (absent: the engine's default; no max_tokens: the rest of the context).
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Token id (a string, as JSON keys are) -> bias.
    logit_bias: dict[str, float] | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    # Logprobs asked for: how many alternatives per token (0: the token's own only).
    logprobs: int | None = None
    # {"json": schema} or {"json_object": True} (vLLM structured outputs).
    structured_output: dict[str, Any] | None = None

    # Chat template and reply.
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning: ReasoningMode | None = None
    tools: list[dict[str, Any]] | None = None
    # `required` or {"type": "function", "function": {"name": ...}}: forced (worker/tool_calls.py)
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> StoredRequest:
        """A stored row's request, of any version written so far (see the module doc);
        a value of the wrong type still raises `pydantic.ValidationError`."""
        known = {key: value for key, value in data.items() if key in _FIELDS}
        known["reasoning"] = cls.reasoning_of(data)
        return cls.model_validate(known)

    @staticmethod
    def reasoning_of(data: Mapping[str, Any]) -> ReasoningMode | None:
        """A stored row's `reasoning` alone, as `load` reads it: answers read only this,
        and should not validate a whole history per row (batch output, job polls)."""
        mode = data.get("reasoning")
        if mode is None and data.get("thinking"):
            return "tagged"  # rows from before `reasoning`
        return mode

    def dump(self) -> dict[str, Any]:
        """The JSON stored in `Job.request`: fields left at their default are left out
        (the shape rows had before this model), the version always in."""
        return {"version": self.version, **self.model_dump(mode="json", exclude_defaults=True)}

    @property
    def parses_tool_calls(self) -> bool:
        """Whether the reply is parsed for tool calls: it has `tools`, and `tool_choice`
        is not `none` (the tools are then shown to the template and the reply is plain
        content, as in vLLM). See api/openai/tools.py and worker/tool_calls.py."""
        return bool(self.tools) and self.tool_choice != "none"


_FIELDS = frozenset(StoredRequest.model_fields)
