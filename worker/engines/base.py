"""The one interface every engine speaks.

The runner owns exactly one engine per worker process and drives it from one asyncio
loop; many Celery task threads hand it requests, so the engine sees them all at once and
batches them continuously. An engine never touches SQL or Redis: it turns a
`GenerationRequest` into a stream of `Delta`s and can abort a request by id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """OpenAI-style sampling knobs; None means the engine's default."""

    # None: the rest of the context (max_model_len - prompt tokens), as in vLLM and OpenAI.
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # vLLM's extensions: keep tokens with at least min_p x the top token's probability;
    # divide (positive) logits of tokens already in the prompt or output by
    # repetition_penalty; no end token before min_tokens.
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    # OpenAI's logit_bias: token id -> bias added to its logit (-100 bans, +100 forces).
    logit_bias: dict[int, float] | None = None
    # None: no logprobs (no work at all); k >= 0: each output token's logprob and the k
    # most likely tokens' (of the model's raw distribution, as vLLM reports them).
    logprobs: int | None = None
    # vLLM's extension: keep generating past end tokens, up to max_tokens.
    ignore_eos: bool = False
    # {"json": schema} or {"json_object": True} (OpenAI `response_format`): output is
    # constrained by the engine; only engines whose ModelInfo says so accept it.
    structured_output: dict[str, Any] | None = None
    # vLLM's: leave special tokens out of the text (a tool-call parser whose tags are
    # special tokens in some models asks to keep them).
    skip_special_tokens: bool = True


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    # OpenAI chat messages; rendered with the model's chat template by the engine. Content
    # is a string or a list of parts: {"type": "text", "text": ...} and {"type": "image"}
    # (a placeholder for the next of `images`). Exactly one of `messages` / `prompt` is set.
    messages: list[dict[str, Any]] | None = None
    # A completion prompt: text, or a list of the same parts (each image part becomes the
    # model's image placeholder).
    prompt: str | list[dict[str, Any]] | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # Lower value = served first (vLLM's convention). Bulk work uses a larger number.
    priority: int = 0
    # Extra variables for the chat template (e.g. {"enable_thinking": True}).
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI function tools, for the chat template's `tools` (as vLLM passes them).
    tools: list[dict[str, Any]] | None = None
    # Decoded RGB images, in the order their placeholders appear in messages / prompt.
    images: tuple[Image, ...] = ()
    # False: nobody watches the text as it comes (batch lines), so the engine may hand it
    # over in one piece at the end, sparing the worker a wake-up per token.
    stream: bool = True
    # The name of a LoRA adapter this worker serves (`--lora-modules`): run with it.
    lora: str | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One output token's logprob, with the most likely alternatives (token text, logprob)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """New output since the previous delta of the same request."""

    text: str
    # Number of new tokens this delta carries (may be >1 when the engine coalesces).
    new_tokens: int
    # Set once, on the delta that carries it (normally the first one).
    prompt_tokens: int | None = None
    # Set on the last delta: "stop", "length", "abort".
    finish_reason: str | None = None
    # With SamplingOptions.logprobs: one entry per token of this delta (new_tokens of them).
    logprobs: tuple[TokenLogprob, ...] | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What workers announce about the model they serve (read by the API)."""

    name: str
    max_model_len: int
    engine: str
    supports_images: bool = False
    # Can constrain output with `SamplingOptions.structured_output` (JSON / JSON schema).
    supports_structured_output: bool = False


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """Requests inside the engine now, as it counts them, and its KV-cache use (0..1;
    None where the engine has no such figure)."""

    running: int
    waiting: int
    kv_cache_usage: float | None = None


@runtime_checkable
class ReportsLoad(Protocol):
    """An engine that reports its load (the worker exports it through Redis)."""

    def load(self) -> EngineLoad: ...


class Engine(Protocol):
    """Start once, generate many requests concurrently, stop once."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, once started (tool-call parsers read it)."""
        ...

    async def start(self) -> None:
        """Load the model; must be awaited inside the loop that will call generate."""

    async def stop(self) -> None:
        """Release the model and any engine processes."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas until the request finishes or is aborted.

        An aborted request ends with a delta whose finish_reason is "abort" (or simply
        ends); invalid requests raise `EngineRequestError`.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a running request; unknown ids are ignored."""
