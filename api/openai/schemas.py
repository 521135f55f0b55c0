"""OpenAI-compatible wire types (chat completions, models), as vLLM serves them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

from api.core.errors import ACCEPTED_RATE_HEADERS, error_responses
from api.streaming import sse

# `/v1/chat/completions` and `/v1/completions`: `stream: true` answers Server-Sent Events.
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": sse.openapi_content(
            "With `stream: true`: a chunk (JSON; an error object if the job fails), `[DONE]` last"
        ),
        "headers": ACCEPTED_RATE_HEADERS,
    },
    **error_responses(400, 401, 404, 413, 429, 500, 503, 504),
}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ImageUrlPart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class UnsupportedPart(BaseModel):
    """Parts OpenAI-style clients send (FastDeploy's `video_url`, OpenAI's `input_audio`
    and `file`) that no Ferry model takes: accepted here so the answer is a 400 naming
    them (api.jobs.service.refuse_unsupported_parts), not a validation dump."""

    model_config = ConfigDict(extra="allow")

    type: Literal["video_url", "input_audio", "file"]


ContentPart = Annotated[TextPart | ImageUrlPart | UnsupportedPart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    # JSON text, as the model wrote it (OpenAI's shape); templates get it decoded.
    arguments: str


class ToolCall(BaseModel):
    """A call the model made (`message.tool_calls`), or one sent back in an assistant
    message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # An assistant turn that called tools, and a tool's answer to one of those calls: both
    # reach the chat template in OpenAI's shape.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(BaseModel):
    """An OpenAI function tool (`tools[]`)."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
    Field(discriminator="type"),
]

# Ferry keeps OpenAI's metadata (string pairs) and also takes FastDeploy's flags in it,
# such as `{"enable_thinking": true}`.
Metadata = dict[str, str | StrictBool]


class SamplingFields(BaseModel):
    """The sampling knobs shared by chat completions and jobs.

    Fields not declared here are kept (`model_extra`) and refused by
    `api.jobs.service.sampling_request`: by name when Ferry knows them (OpenAI's and
    vLLM's) but cannot honour them, as unrecognized otherwise, as OpenAI does."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        description="The served model id (`GET /v1/models`). Omitted, or an alias "
        "(FERRY_MODEL_ALIASES, by default `null` and `default`): the default model "
        "(FERRY_DEFAULT_MODEL, else the only one served); a request that carries images "
        "then goes to a model that takes images. The answer names the model used.",
    )
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; -1 or 0 = off")
    max_tokens: int | None = Field(None, ge=1, description="Deprecated OpenAI name")
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit "
        "before sampling (-100 bans the token, +100 all but forces it); up to 300 tokens. "
        "Ids outside the model's vocabulary fail the job.",
        # What `_logit_bias` checks, for the document.
        json_schema_extra={
            "anyOf": [
                {
                    "type": "object",
                    "propertyNames": {"pattern": "^[0-9]+$"},
                    "maxProperties": 300,
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                },
                {"type": "null"},
            ]
        },
    )
    min_p: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="vLLM extension: drop tokens less likely than "
        "min_p x the most likely one's probability",
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        description="vLLM extension: > 1 discourages tokens already "
        "in the prompt or the output (1 = off)",
    )
    min_tokens: int | None = Field(
        None,
        ge=0,
        description="vLLM extension: no end token or stop string ends the "
        "output before this many tokens",
    )
    n: int = Field(
        1,
        ge=1,
        le=16,
        description="Choices to generate (each its own job; with `seed`, "
        "choice i samples with seed + i). Not with `conversation_id`, nor on `/v1/jobs`.",
    )
    ignore_eos: StrictBool = Field(
        False,
        description="vLLM extension: keep generating past the model's end token, up "
        "to max_tokens (benchmarks, load tests)",
    )
    user: str | None = None
    response_format: ResponseFormat | None = Field(
        None,
        description="`json_object` or `json_schema`: output constrained by the engine's "
        "structured outputs (vLLM). A model whose engine cannot constrain output answers "
        "400.",
    )
    priority: int = Field(0, ge=0, le=9, description="vLLM extension: 0 is served first, 9 last")
    metadata: Metadata | None = Field(
        None,
        description="Up to 16 pairs, kept with the job (FastDeploy flags such as "
        "`enable_thinking` are read from here too)",
    )
    deadline_seconds: float | None = Field(
        None,
        gt=0,
        strict=True,
        allow_inf_nan=False,
        description="Ferry extension: a job still queued this many seconds after it was "
        "made ends `expired` and never runs (a running one is not cut). Also the "
        "`Cancel-After` header. Default: the deployment's (FERRY_DEADLINE_INTERACTIVE_SECONDS; "
        "a batch line: its batch's completion window); at most FERRY_MAX_DEADLINE_SECONDS.",
    )

    @model_validator(mode="after")
    def _stop_list(self) -> SamplingFields:
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop: at most 16 sequences")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is None:
            return None
        if len(bias) > 300:
            raise ValueError("at most 300 tokens")
        for token, value in bias.items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids (strings of digits), got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"biases are in [-100, 100], got {value} for {token}")
        return bias

    @model_validator(mode="after")
    def _metadata_size(self) -> SamplingFields:
        if self.metadata is not None and len(self.metadata) > 16:
            raise ValueError("metadata: at most 16 keys")
        return self

    @property
    def logprobs_wanted(self) -> int | None:
        """How many alternatives per token the answer's logprobs carry; None: no logprobs."""
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def structured_output(self) -> dict[str, Any] | None:
        """The stored constraint for the engine: {"json": schema} or {"json_object": True}."""
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonSchema):
            return {"json": fmt.json_schema.schema_ or {"type": "object"}}
        if isinstance(fmt, ResponseFormatJsonObject):
            return {"json_object": True}
        return None


class ChatCompletionRequest(SamplingFields):
    # `_top_logprobs_need_logprobs`, for the document: top_logprobs > 0 needs logprobs.
    model_config = ConfigDict(
        json_schema_extra={
            "if": {
                "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
                "required": ["top_logprobs"],
            },
            "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None,
        description="vLLM extension: extra variables for the chat template, e.g. "
        '`{"enable_thinking": false}` (also read from FastDeploy\'s `metadata`)',
    )
    images: list[str] | None = Field(
        None,
        description="swift extension: images (http(s) URL, data URL or base64) for "
        "models that take them. Each `<image>` placeholder in the user messages takes the "
        "next one; with no placeholder they all go before the last user message's text. "
        "Images can also come as `image_url` parts or Qwen-VL `<img>…</img>` tags.",
    )
    logprobs: bool | None = Field(
        None, description="Return each output token's logprob (`choices[].logprobs.content`)"
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="With `logprobs`: the most likely tokens (up to 20) "
        "at each position, with their logprobs",
    )
    tools: list[FunctionTool] | None = Field(
        None,
        max_length=128,
        description="Function tools, for a model whose worker was "
        "started with `--tool-call-parser` (vLLM's parsers by name); otherwise 400. They "
        "reach the chat template (`tools`); the reply's tool calls come back as "
        "`message.tool_calls` with finish_reason `tool_calls`.",
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None,
        description="`auto` (the default with `tools`), `none` (tools are still "
        "shown to the template, the reply is not parsed), `required` (the reply is one or "
        'more tool calls) or `{"type": "function", "function": {"name": NAME}}` '
        "(the reply calls that function). The last two are forced with structured outputs, "
        "as vLLM does: a vLLM worker only, not with `response_format`.",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="With `tools`: false keeps only the first tool call, as vLLM does"
    )
    conversation_id: str | None = Field(
        None,
        max_length=40,
        description="Ferry extension: continue a stored conversation (`POST "
        "/v1/conversations`). The prompt is its history plus `messages`; when the job "
        "succeeds, the new turn and the reply are appended to it (not when it fails or "
        "is cancelled).",
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("needs `logprobs: true`")
        return value

    @property
    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def enable_thinking(self) -> bool | None:
        """`enable_thinking` as asked for the vLLM way (`chat_template_kwargs`) or the
        FastDeploy way (`metadata.enable_thinking`), true or false; None when not asked.
        It reaches the chat template either way."""
        for source in (self.chat_template_kwargs, self.metadata):
            if source and isinstance(source.get("enable_thinking"), bool):
                return bool(source["enable_thinking"])
        return None

    @property
    def carries_images(self) -> bool:
        """Images in any of the three forms (swift `images`, `image_url` parts, Qwen-VL
        `<img>` tags in user text): a request naming no model goes to one that takes
        them."""
        if self.images:
            return True
        for message in self.messages:
            content = message.content
            if isinstance(content, str):
                if message.role == "user" and "<img>" in content:
                    return True
            elif content is not None:
                for part in content:
                    if isinstance(part, ImageUrlPart):
                        return True
                    if (
                        isinstance(part, TextPart)
                        and message.role == "user"
                        and "<img>" in part.text
                    ):
                        return True
        return False


class CompletionRequest(SamplingFields):
    """OpenAI (legacy) completions, as vLLM serves them: for base models, no chat template.

    `prompt` may carry Qwen-VL `<img>…</img>` tags (URL or base64) for image models."""

    prompt: str | list[str] = Field(
        description="A prompt, or a list of up to 16 prompts (one choice each)",
        # What `_prompts` checks (its own messages, so not as pydantic constraints).
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": 16,
                },
            ]
        },
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = Field(False, description="Return the prompt before the completion")
    # Typed as clients send them; any value but null is refused (400 naming the field).
    suffix: str | None = Field(
        None, description="Not supported (400)", json_schema_extra={"anyOf": [{"type": "null"}]}
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="Each output token's logprob and the `logprobs` most "
        "likely tokens' at its position (up to 20)",
    )
    best_of: int | None = Field(
        None, description="Not supported (400)", json_schema_extra={"anyOf": [{"type": "null"}]}
    )

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: str | list[str]) -> str | list[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not 1 <= len(prompts) <= 16:
            raise ValueError("give 1 to 16 prompts")
        if any(not p for p in prompts):
            raise ValueError("a prompt must not be empty")
        return prompt

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def logprobs_wanted(self) -> int | None:
        return self.logprobs


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    # vLLM/FastDeploy: the model's thinking (null when there is none): split out by default
    # for a model served with a reasoning parser, else when thinking is asked for.
    reasoning_content: str | None = None
    # The tools the reply calls, found by the model's tool-call parser ([] as in vLLM).
    tool_calls: list[ToolCall] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ferry"
    max_model_len: int
    # Ferry extensions: which engine serves it, whether it takes images, live workers.
    engine: str
    supports_images: bool
    supports_structured_output: bool
    workers: int
    # The same count (FERRY_MODELS lists a model with none: 0).
    live_workers: int
    # vLLM's: what the model was loaded from, and a LoRA adapter's base model (else None).
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Stored logprob entries ({"token", "logprob", "top_logprobs"}) in OpenAI's chat
    shape: each token with its UTF-8 bytes."""
    return {
        "content": [
            {
                "token": e["token"],
                "logprob": e["logprob"],
                "bytes": list(e["token"].encode()),
                "top_logprobs": [
                    {
                        "token": t["token"],
                        "logprob": t["logprob"],
                        "bytes": list(t["token"].encode()),
                    }
                    for t in e["top_logprobs"]
                ],
            }
            for e in entries
        ]
    }


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """Stored logprob entries in OpenAI's legacy completions shape; `offset`: where the
    first token starts in the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        "text_offset": offsets,
    }


def chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    index: int = 0,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One `chat.completion.chunk` (a plain dict: built per token, kept cheap)."""
    choices = (
        []
        if delta is None
        else [
            {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        ]
    )
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body
