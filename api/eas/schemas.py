"""Wire types of the PAI-EAS APIs Ferry speaks: the MLLM WebUI API (`/infer_forward`,
`/get_history`, `/clear_history`) and the "Transformers standard" LLM API (`POST /`, and
the same JSON over the WebSocket at `/`).

Histories are typed `Any` here and checked by
`api.conversations.history.parse_pairs`, which names the
offending item; the JSON schema still documents them as lists of pairs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

_PAIRS_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
}


class InferForwardRequest(BaseModel):
    """`POST /infer_forward`, as the PAI-EAS MLLM client sends it."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", description="The question")
    image: str | None = Field(
        None,
        description="An image: base64 (as the EAS client sends it), a data URL or "
        "an http(s) URL; needs a served model that takes images",
    )
    chat_history: Any = Field(
        default_factory=list,
        json_schema_extra=_PAIRS_SCHEMA,
        description="`[[user, assistant], ...]`. Empty, or what `/get_history` returned: "
        "the caller's stored history (with its images) is the prompt's history. Any "
        "other history replaces it for this prompt (text only).",
    )
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    top_p: float = Field(0.7, gt=0.0, le=1.0)
    max_output_tokens: int = Field(
        512, ge=1, description="A ceiling: lowered to what the model's context leaves"
    )
    use_stream: bool = Field(
        False, description="Stream the answer: the text so far, then `##END`, repeatedly"
    )


class InferForwardResponse(BaseModel):
    response: str
    chat_history: list[list[str]] = Field(description="The caller's history, this turn last")


class ChatHistory(BaseModel):
    chat_history: list[list[str]]


class TransformersChatRequest(BaseModel):
    """PAI-EAS "Transformers standard" request (`POST /` as JSON, or a WebSocket message)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", description="The user prompt")
    system_prompt: str = Field("", description="The system prompt")
    history: Any = Field(
        None,
        json_schema_extra=_PAIRS_SCHEMA,
        description="`[[user, assistant], ...]`, managed by the client. Over the WebSocket, "
        "leaving it out continues the connection's own history.",
    )
    temperature: float = Field(0.95, ge=0.0, le=2.0)
    top_k: int = Field(30, ge=-1, description="0 or -1: off")
    top_p: float = Field(0.8, gt=0.0, le=1.0)
    max_new_tokens: int = Field(
        2048, ge=1, description="A ceiling: lowered to what the model's context leaves"
    )
    do_sample: bool = Field(True, description="false: greedy decoding")
    use_stream_chat: bool = Field(
        True,
        description="Stream: NUL-delimited JSON objects over HTTP, text messages over "
        "the WebSocket",
    )
    use_cache: bool = Field(True, description="Accepted; the engine always caches")
    langchain: bool = Field(False, description="Accepted; Ferry has no knowledge base")


class TransformersChatResponse(BaseModel):
    response: str = Field(description="The answer (in a stream: the text this chunk adds)")
    history: list[list[str]] = Field(
        description="The request's history with this turn last (in a stream: the answer so far)"
    )
